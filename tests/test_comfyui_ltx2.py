"""LTX-2 in ComfyUI's real code, on the CPU: our tiny LTX-2 files and their int8 conversions are
read by ComfyUI's own detection as LTXAV with our sizes, and the node pack's loader builds ComfyUI's
LTXAV model with our int8 layers exactly where the file stores int8 (LTX-2 does not run in our engine).

ComfyUI reads the depth, video head width (32 heads) and cross-attention width off the tensors; the
audio, caption and text-connector widths come from the release file's metadata, which a tiny file
does not have: comfyui_env.tiny_detection reads them off the tensors.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_env import tiny_detection
from safetensors import safe_open
from test_comfyui_nodes import comfy  # noqa: F401  (the session fixture: ComfyUI imported)
from tiny_checkpoints import write_single_file

from comfyui_nodes.loader import int8_layers, load_diffusion_model
from engine.convert import ConvertRequest, run_convert
from engine.demo import random_weights
from engine.models import REGISTRY

LTX2 = REGISTRY["ltx2"]


def tiny_ltx2(path, prefix: str = ""):
    """A tiny LTX-2 file and our row-wise int8 conversion of it."""
    tensors = dict(random_weights(LTX2, LTX2.tiny["tiny"], torch.bfloat16, torch.Generator().manual_seed(5)))
    source = write_single_file(path, LTX2, prefix=prefix, tensors=tensors).path
    return source, run_convert(ConvertRequest(source, scheme="rowwise", device="cpu")).output


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_detects_our_ltx2_and_its_int8_conversion(comfy, tmp_path, prefix):  # noqa: F811
    from comfy.utils import load_torch_file

    source, converted = tiny_ltx2(tmp_path / "ltx2.safetensors", prefix)
    with tiny_detection(comfy):
        for path, key_prefix in ((source, prefix), (converted, "")):
            model_config = comfy.detection.model_config_from_unet(load_torch_file(str(path)), key_prefix)
            assert type(model_config).__name__ == "LTXAV"
            unet = model_config.unet_config
            assert (unet["num_layers"], unet["attention_head_dim"], unet["cross_attention_dim"]) == (2, 8, 256)
            assert (unet["audio_attention_head_dim"], unet["caption_channels"]) == (4, 64)


def test_our_int8_ltx2_loads_into_comfyuis_model(comfy, tmp_path):  # noqa: F811
    """Every block attention (video, audio, both cross-modal) and FFN linear is our int8 layer; the
    text connectors, adaLN-singles, patchifiers and heads are not."""
    _, converted = tiny_ltx2(tmp_path / "ltx2.safetensors")
    with tiny_detection(comfy):
        ours = load_diffusion_model(converted)
    with safe_open(str(converted), "pt") as f:
        stored = {k.removesuffix(".weight") for k in f.keys() if f.get_slice(k).get_dtype() == "I8"}  # noqa: SIM118
    assert set(int8_layers(ours.model.diffusion_model)) == stored
    assert len(stored) == 2 * (6 * 4 + 2 * 2) and all(n.startswith("transformer_blocks.") for n in stored)
