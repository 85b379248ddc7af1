"""LTX-2 and LTX-2.3 in ComfyUI's real code, on the CPU: our tiny files and their int8 conversions are
read by ComfyUI's own detection as LTXAV with our sizes and layout, and the node pack's loader builds
ComfyUI's LTXAV model with our int8 layers exactly where the file stores int8 and runs one step of
video and audio as close to ComfyUI's bf16 output as ComfyUI's own int8 path (LTX-2 does not run in our
engine).

ComfyUI reads the depth, video head width (32 heads) and cross-attention width off the tensors; the
rest comes from the release file's ``config`` metadata. An LTX-2 tiny file has none
(comfyui_env.tiny_detection reads those sizes off the tensors); an LTX-2.3 tiny file carries it as the
release does, since only the metadata tells ComfyUI the 2.3 layout (gated attention, prompt modulation,
text projected before the model), and a conversion must keep it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_comfyui_nodes import assert_as_close_as_native, comfy  # noqa: F401  (the session fixture: ComfyUI imported)
from tiny_checkpoints import write_single_file

from comfyui_nodes.loader import int8_layers, load_diffusion_model
from engine.convert import ConvertRequest, run_convert
from engine.demo import random_weights
from engine.models import REGISTRY

LTX2 = REGISTRY["ltx2"]
TINY_2_3 = LTX2.tiny["tiny-2.3"]
# The LTX-2.3 release's transformer config (ComfyUI's LTXAV arguments), at the tiny sizes: 32 heads everywhere.
CONFIG_2_3 = {
    "apply_gated_attention": True, "connector_apply_gated_attention": True, "cross_attention_adaln": True,
    "caption_proj_before_connector": True, "caption_projection_first_linear": False, "caption_channels": 64,
    "connector_num_layers": TINY_2_3["connector_layers"], "connector_num_attention_heads": 32,
    "connector_attention_head_dim": TINY_2_3["connector_dim"] // 32, "audio_connector_num_attention_heads": 32,
    "audio_connector_attention_head_dim": TINY_2_3["audio_connector_dim"] // 32,
    "audio_attention_head_dim": TINY_2_3["audio_dim"] // 32, "audio_cross_attention_dim": TINY_2_3["audio_dim"],
}  # fmt: skip
METADATA = {"tiny": {}, "tiny-2.3": {"config": json.dumps({"transformer": CONFIG_2_3})}}


def tiny_ltx2(path, variant: str = "tiny", prefix: str = ""):
    """A tiny LTX-2 (or 2.3) file and our row-wise int8 conversion of it."""
    config = LTX2.tiny[variant]
    tensors = dict(random_weights(LTX2, config, torch.bfloat16, torch.Generator().manual_seed(5)))
    source = write_single_file(path, LTX2, variant, prefix=prefix, tensors=tensors, metadata=METADATA[variant]).path
    return source, run_convert(ConvertRequest(source, scheme="rowwise", device="cpu")).output


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("variant", METADATA)
def test_comfyui_detects_our_ltx2_and_its_int8_conversion(comfy, tmp_path, variant, prefix):  # noqa: F811
    from comfy.utils import load_torch_file

    source, converted = tiny_ltx2(tmp_path / "ltx2.safetensors", variant, prefix)
    v2_3 = variant == "tiny-2.3"
    for path, key_prefix in ((source, prefix), (converted, "")):
        state_dict, metadata = load_torch_file(str(path), return_metadata=True)
        model_config = comfy.detection.model_config_from_unet(state_dict, key_prefix, metadata=metadata)
        assert type(model_config).__name__ == "LTXAV"
        unet = model_config.unet_config
        assert (unet["num_layers"], unet["attention_head_dim"], unet["cross_attention_dim"]) == (2, 8, 256)
        assert (unet["audio_attention_head_dim"], unet["caption_channels"]) == (4, 64)
        assert unet.get("apply_gated_attention", False) == unet.get("cross_attention_adaln", False) == v2_3


@pytest.mark.parametrize("variant", METADATA)
def test_our_int8_ltx2_runs_in_comfyuis_model(comfy, tmp_path, variant):  # noqa: F811
    """Every block attention (video, audio, both cross-modal) and FFN linear is our int8 layer; the
    text connectors, adaLN-singles, patchifiers, 2.3's gates and heads are not, and ComfyUI's model has
    exactly the file's tensors. One step on a video and an audio latent, packed as ComfyUI's sampler
    packs them; the text goes through ComfyUI's own connectors first (its conditioning does that once
    per prompt, at bf16 in every file), from Gemma's width (LTX-2) or the per-modality projections'
    (LTX-2.3)."""
    from comfy.utils import pack_latents

    source, converted = tiny_ltx2(tmp_path / "ltx2.safetensors", variant)
    ours = load_diffusion_model(converted)
    with safe_open(str(converted), "pt") as f:
        stored = {k.removesuffix(".weight") for k in f.keys() if f.get_slice(k).get_dtype() == "I8"}  # noqa: SIM118
        names = set(f.keys())
    model = ours.model.diffusion_model
    assert set(int8_layers(model)) == stored and set(model.state_dict()) == names
    assert len(stored) == 2 * (6 * 4 + 2 * 2) and all(n.startswith("transformer_blocks.") for n in stored)

    c, g = LTX2.tiny[variant], torch.Generator().manual_seed(0)
    x, shapes = pack_latents([torch.randn(1, 128, 2, 4, 6, generator=g), torch.randn(1, 8, 5, 16, generator=g)])
    text = torch.randn(1, 7, c["caption_channels"] or c["dim"] + c["audio_dim"], generator=g)
    with torch.inference_mode():
        context = model.preprocess_text_embeds(text.to(ours.model.get_dtype_inference()), unprocessed=True)
    kwargs = {"c_crossattn": context, "latent_shapes": shapes, "frame_rate": 25}
    assert_as_close_as_native(comfy, source, converted, ours, x, kwargs)
