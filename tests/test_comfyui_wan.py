"""Wan in ComfyUI's real code, on the CPU: our tiny Wan files and their int8 conversions are read by
ComfyUI's own detection as the release they stand for, and the node pack's loader runs them in
ComfyUI's Wan model with our int8 layers (Wan does not run in our engine).

ComfyUI reads Wan's width, FFN width, channels and depth off the tensors and hard-codes the rest to
the releases' (128-wide heads, 4096 text channels from umT5, 1×2×2 patches): the sizes below respect
that, so no detection patch is needed.
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

WAN = REGISTRY["wan"]
TINY_T2V = {**WAN.variants["2.1 T2V 14B / 2.2 T2V A14B"], "dim": 256, "ffn_dim": 512, "layers": 2}
TINY_5B = {**TINY_T2V, "in_channels": 48, "out_channels": 48}  # Wan 2.2 TI2V 5B's latent channels


def tiny_wan(path, config, prefix: str = ""):
    """A Wan file of ``config`` and our row-wise int8 conversion of it."""
    tensors = dict(random_weights(WAN, config, torch.bfloat16, torch.Generator().manual_seed(7)))
    source = write_single_file(path, WAN, prefix=prefix, tensors=tensors).path
    return source, run_convert(ConvertRequest(source, scheme="rowwise", device="cpu")).output


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("config,expected", [(TINY_T2V, "WAN21_T2V"), (TINY_5B, "WAN22_T2V")])
def test_comfyui_detects_our_wan_and_its_int8_conversion(comfy, tmp_path, prefix, config, expected):  # noqa: F811
    """Wan 2.1/2.2 14B's layout reads as WAN21_T2V, the 5B's (48 latent channels) as WAN22_T2V."""
    from comfy.utils import load_torch_file

    source, converted = tiny_wan(tmp_path / "wan.safetensors", config, prefix)
    for path, key_prefix in ((source, prefix), (converted, "")):
        model_config = comfy.detection.model_config_from_unet(load_torch_file(str(path)), key_prefix)
        assert type(model_config).__name__ == expected
        unet = model_config.unet_config
        found = (unet["dim"], unet["ffn_dim"], unet["num_heads"], unet["num_layers"], unet["in_dim"], unet["out_dim"])
        assert found == (256, 512, 2, 2, config["in_channels"], config["out_channels"])


def test_our_int8_wan_runs_in_comfyuis_model(comfy, tmp_path):  # noqa: F811
    """The node pack's loader puts our int8 layers exactly where the file stores int8 (every block
    attention and FFN linear); one step on a tiny video latent is as close to ComfyUI's bf16 output
    as ComfyUI's own int8 path is."""
    source, converted = tiny_wan(tmp_path / "wan.safetensors", TINY_T2V)
    ours = load_diffusion_model(converted)
    with safe_open(str(converted), "pt") as f:
        stored = {k.removesuffix(".weight") for k in f.keys() if f.get_slice(k).get_dtype() == "I8"}  # noqa: SIM118
    layers = int8_layers(ours.model.diffusion_model)
    assert set(layers) == stored == {n for n in stored if ".self_attn." in n or ".cross_attn." in n or ".ffn." in n}
    assert len(stored) == 2 * 10  # per block: self and cross attention q, k, v, o; ffn.0, ffn.2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 6, 10, generator=g)  # batch, channels, frames, rows, columns
    kwargs = {"c_crossattn": torch.randn(2, 7, 4096, generator=g)}
    assert_as_close_as_native(comfy, source, converted, ours, x, kwargs)
