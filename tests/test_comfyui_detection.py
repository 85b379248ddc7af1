"""ComfyUI's own detection, in its real code on the CPU, reads our tiny Flux.1 (dev and schnell) and
Qwen-Image files and our int8 conversions of them as those models, with our sizes (Qwen-Image's Edit 2511
and Layered told apart); and our engine's Qwen-Image module gives ComfyUI's output on one file. (The
other families: test_comfyui_nodes.py, test_comfyui_variants.py, test_comfyui_detection_only.py.)
"""

# ruff: noqa: F811  (the fixtures of test_comfyui_nodes, imported by name)

from __future__ import annotations

import pytest
import torch
from comfyui_env import TINY
from test_comfyui_nodes import (  # noqa: F401  (comfy, files: the session fixtures)
    comfy,
    error,
    files,
    load_comfy,
    model_inputs,
)
from tiny_checkpoints import write_single_file

from engine.convert import ConvertRequest, run_convert
from engine.demo import random_weights
from engine.models import REGISTRY


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("guidance,expected", [(True, "Flux"), (False, "FluxSchnell")])
def test_comfyui_detects_our_flux1(comfy, tmp_path, prefix, guidance, expected):
    """ComfyUI's own detection reads our tiny Flux.1 file as Flux.1 dev or schnell, with our sizes."""
    config = {**TINY["flux1"], "guidance": guidance}
    tensors = dict(random_weights(REGISTRY["flux1"], config, torch.bfloat16, torch.Generator().manual_seed(5)))
    path = write_single_file(tmp_path / "flux1.safetensors", "flux1", prefix=prefix, tensors=tensors).path
    from comfy.utils import load_torch_file

    model_config = comfy.detection.model_config_from_unet(load_torch_file(str(path)), prefix)
    assert type(model_config).__name__ == expected
    unet = model_config.unet_config
    assert (unet["hidden_size"], unet["num_heads"], unet["vec_in_dim"], unet["context_in_dim"]) == (256, 2, 24, 48)
    assert (unet["depth"], unet["depth_single_blocks"], unet["guidance_embed"]) == (2, 2, guidance)


# What two Qwen-Image releases add to its layout, and what ComfyUI's detection makes of each.
QWEN_RELEASES = {
    "20B": ({}, {"default_ref_method": None, "use_additional_t_cond": None}),
    "Edit 2511": ({"__index_timestep_zero__": torch.empty(0, dtype=torch.bfloat16)},
                  {"default_ref_method": "index_timestep_zero", "use_additional_t_cond": None}),
    "Layered": ({"time_text_embed.addition_t_embedding.weight": torch.zeros(2, 256, dtype=torch.bfloat16)},
                {"default_ref_method": "negative_index", "use_additional_t_cond": True}),
}  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("release", QWEN_RELEASES)
def test_comfyui_detects_our_qwen_image_and_its_int8_conversion(comfy, tmp_path, prefix, release):
    """ComfyUI's own detection reads our tiny Qwen-Image file, and our int8 conversion of it, as
    Qwen-Image with our sizes; the tensors by which it tells Edit 2511 and Layered apart pass through."""
    extra, expected = QWEN_RELEASES[release]
    generator = torch.Generator().manual_seed(6)
    tensors = dict(random_weights(REGISTRY["qwen_image"], TINY["qwen_image"], torch.bfloat16, generator)) | extra
    source = write_single_file(tmp_path / "qwen.safetensors", "qwen_image", prefix=prefix, tensors=tensors).path
    converted = run_convert(ConvertRequest(source, scheme="rowwise", device="cpu")).output
    from comfy.utils import load_torch_file

    for path, key_prefix in ((source, prefix), (converted, "")):
        model_config = comfy.detection.model_config_from_unet(load_torch_file(str(path)), key_prefix)
        assert type(model_config).__name__ == "QwenImage"
        unet = model_config.unet_config
        assert (unet["in_channels"], unet["num_layers"], unet["num_attention_heads"], unet["joint_attention_dim"]) == (64, 2, 2, 48)
        assert {k: unet.get(k) for k in expected} == expected


def test_our_qwen_image_module_matches_comfyuis(comfy, files):
    """Our engine's Qwen-Image and ComfyUI's, on one file, give one output on an even patch grid (on
    an odd one ComfyUI centres RoPE's positions one higher than diffusers, which ours follows)."""
    from engine.checkpoint import CheckpointReader
    from engine.models.build import load_model

    name = files["qwen_image", "float"]
    model = load_comfy(comfy, name)
    comfy.mm.load_models_gpu([model])
    x, sigma, kwargs = model_inputs("qwen_image", rows=8, cols=12)
    with CheckpointReader(comfy.folder_paths.get_full_path_or_raise("diffusion_models", name)) as reader:
        ours = load_model(reader, torch.device("cpu"), torch.float32)[0]
    with torch.inference_mode():
        theirs = model.model.diffusion_model(x, sigma, kwargs["c_crossattn"]).float()[:, :, 0]
        assert error(ours(x[:, :, 0], sigma, kwargs["c_crossattn"]), theirs) < 1e-5
