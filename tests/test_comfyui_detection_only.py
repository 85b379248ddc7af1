"""Issue 26's detection-only families (Krea 2, ERNIE-Image, HiDream-O1, Anima) in ComfyUI's real code, on
the CPU (they do not run in our engine): ComfyUI's own detection reads our tiny files and their int8
conversions as the family, with our sizes, and the node pack's loader runs each int8 conversion in
ComfyUI's model with our int8 Linear exactly where the file stores int8, one step as close to ComfyUI's
bf16 output as ComfyUI's own int8 path is (as test_comfyui_wan.py does for Wan).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_comfyui_nodes import assert_as_close_as_native, comfy  # noqa: F401  (the session fixture: ComfyUI imported)
from tiny_checkpoints import write_single_file

from comfyui_nodes.loader import int8_layers, load_diffusion_model
from engine.convert import ConvertRequest, run_convert
from engine.demo import random_weights
from engine.models import REGISTRY

KREA2, ERNIE = REGISTRY["krea2"].tiny["tiny"], REGISTRY["ernie"].tiny["tiny"]
HIDREAM_O1, ANIMA = REGISTRY["hidream_o1"].tiny["tiny"], REGISTRY["anima"].tiny["tiny"]

# family → (ComfyUI's class, what its detection must read: unet_config key → our size)
DETECTED = {
    "krea2": ("Krea2", {
        "features": KREA2["features"], "heads": KREA2["heads"], "kvheads": KREA2["kv_heads"],
        "layers": KREA2["layers"], "channels": KREA2["channels"], "txtdim": KREA2["text_dim"],
        "txtlayers": KREA2["text_layers"],
    }),
    "ernie": ("ErnieImage", {  # read by tiny_detection (ComfyUI hard-codes the 8B's sizes)
        "hidden_size": ERNIE["hidden"], "num_attention_heads": ERNIE["heads"], "num_layers": ERNIE["layers"],
        "ffn_hidden_size": ERNIE["ffn"], "in_channels": ERNIE["in_channels"], "text_in_dim": ERNIE["text_dim"],
    }),
    "hidream_o1": ("HiDreamO1", {  # the decoder's sizes read by tiny_detection (ComfyUI hard-codes Qwen3-VL-8B's)
        "text_config_overrides": {
            "vocab_size": HIDREAM_O1["vocab"], "hidden_size": HIDREAM_O1["hidden"], "head_dim": HIDREAM_O1["head_dim"],
            "num_hidden_layers": HIDREAM_O1["layers"], "num_attention_heads": HIDREAM_O1["heads"],
            "num_key_value_heads": HIDREAM_O1["kv_heads"], "intermediate_size": HIDREAM_O1["ffn"],
        },
    }),
    "anima": ("Anima", {  # ComfyUI reads the width and channels, tiny_detection the depth and heads
        "model_channels": ANIMA["dim"], "in_channels": ANIMA["in_channels"], "num_blocks": ANIMA["layers"],
        "num_heads": ANIMA["heads"], "crossattn_emb_channels": ANIMA["text_dim"],
    }),
}  # fmt: skip


def model_inputs(arch: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A latent and the text conditioning each family's model takes."""
    g = torch.Generator().manual_seed(0)
    if arch == "krea2":  # twelve (here: text_layers) Qwen3-VL layers side by side
        return torch.randn(2, 16, 6, 10, generator=g), {
            "c_crossattn": torch.randn(2, 7, KREA2["text_layers"] * KREA2["text_dim"], generator=g)
        }
    if arch == "ernie":  # Flux.2's 128 latent channels, Ministral 3B's hidden states
        return torch.randn(2, 128, 4, 6, generator=g), {"c_crossattn": torch.randn(2, 7, ERNIE["text_dim"], generator=g)}
    if arch == "hidream_o1":  # RGB pixels and the prompt's token ids, laid out by ComfyUI's own conditioning
        from comfy.ldm.hidream_o1.conditioning import build_extra_conds

        x = torch.randn(2, 3, 64, 64, generator=g)  # 2×2 patches of 32×32 pixels
        # the prompt ends with the timestep's token: the tiny vocabulary's last (comfyui_env.tiny_detection)
        tms = torch.tensor([[HIDREAM_O1["vocab"] - 1]])
        conds = build_extra_conds(torch.cat([torch.randint(0, tms.item(), (1, 6), generator=g), tms], 1), x)
        return x, {k: conds[k] for k in ("input_ids", "position_ids", "vinput_mask", "ar_len")}
    if arch == "anima":  # a Wan 2.1 video latent of one frame; Qwen3's hidden states and the prompt's T5 ids
        return torch.randn(2, 16, 1, 8, 8, generator=g), {
            "c_crossattn": torch.randn(2, 7, ANIMA["llm_dim"], generator=g),
            "t5xxl_ids": torch.randint(0, 32128, (2, 7), generator=g),
        }
    raise ValueError(arch)


def tiny_file(path, arch: str, prefix: str = ""):
    """A tiny file of ``arch`` and our row-wise int8 conversion of it."""
    a = REGISTRY[arch]
    tensors = dict(random_weights(a, a.tiny["tiny"], torch.bfloat16, torch.Generator().manual_seed(7)))
    source = write_single_file(path, a, prefix=prefix, tensors=tensors).path
    return source, run_convert(ConvertRequest(source, scheme="rowwise", device="cpu")).output


@pytest.mark.parametrize(
    "arch,prefix",  # Anima's original file is under Cosmos' net.
    [(a, p) for a in DETECTED for p in ("", "model.diffusion_model.")] + [("anima", "net.")],
)
def test_comfyui_detects_our_file_and_its_int8_conversion(comfy, tmp_path, arch, prefix):  # noqa: F811
    from comfy.utils import load_torch_file

    expected_class, sizes = DETECTED[arch]
    source, converted = tiny_file(tmp_path / f"{arch}.safetensors", arch, prefix)
    for path, key_prefix in ((source, prefix), (converted, "")):
        model_config = comfy.detection.model_config_from_unet(load_torch_file(str(path)), key_prefix)
        assert type(model_config).__name__ == expected_class
        assert {k: model_config.unet_config[k] for k in sizes} == sizes


@pytest.mark.parametrize("arch", DETECTED)
def test_our_int8_conversion_runs_in_comfyuis_model(comfy, tmp_path, arch):  # noqa: F811
    source, converted = tiny_file(tmp_path / f"{arch}.safetensors", arch)
    ours = load_diffusion_model(converted)
    with safe_open(str(converted), "pt") as f:
        stored = {k.removesuffix(".weight") for k in f.keys() if f.get_slice(k).get_dtype() == "I8"}  # noqa: SIM118
    assert set(int8_layers(ours.model.diffusion_model)) == stored and stored

    x, kwargs = model_inputs(arch)
    assert_as_close_as_native(comfy, source, converted, ours, x, kwargs)
