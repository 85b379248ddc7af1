"""Issue 26's variants in ComfyUI's real code, on the CPU: Flux.2 dev (Klein's layout plus the
guidance embedder) and Chroma Radiance (pixel-space Chroma) files and our int8 conversions of them
are read by ComfyUI's own detection as those models, with our sizes; the node pack's loader runs
Flux.2 dev with our int8 layers as close to ComfyUI's bf16 output as ComfyUI's own int8 path is
(Radiance runs in test_comfyui_nodes.py's parametrised tests, beside the other families).
"""

from __future__ import annotations

import pytest
import torch
from comfyui_env import TINY
from test_comfyui_nodes import comfy, error, model_inputs  # noqa: F401  (the session fixture: ComfyUI imported)
from tiny_checkpoints import write_single_file

from comfyui_nodes.loader import int8_layers, load_diffusion_model
from engine.convert import ConvertRequest, run_convert
from engine.demo import random_weights
from engine.models import REGISTRY

ALLOWED = 1.25  # ours may be this much further from the float output than ComfyUI's own int8 path
FLUX2_DEV = {**TINY["flux2"], "guidance": True}


def tiny_file(path, arch: str, config, prefix: str = ""):
    """A tiny file of ``config`` and our row-wise int8 conversion of it."""
    tensors = dict(random_weights(REGISTRY[arch], config, torch.bfloat16, torch.Generator().manual_seed(11)))
    source = write_single_file(path, arch, prefix=prefix, tensors=tensors).path
    return source, run_convert(ConvertRequest(source, scheme="rowwise", device="cpu")).output


def comfy_config(comfy, path, prefix: str):  # noqa: F811
    from comfy.utils import load_torch_file

    return comfy.detection.model_config_from_unet(load_torch_file(str(path)), prefix)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_detects_our_flux2_dev_and_its_int8_conversion(comfy, tmp_path, prefix):  # noqa: F811
    source, converted = tiny_file(tmp_path / "flux2-dev.safetensors", "flux2", FLUX2_DEV, prefix)
    for path, key_prefix in ((source, prefix), (converted, "")):
        model_config = comfy_config(comfy, path, key_prefix)
        assert type(model_config).__name__ == "Flux2"
        unet = model_config.unet_config
        assert (unet["hidden_size"], unet["num_heads"], unet["context_in_dim"], unet["guidance_embed"]) == (256, 2, 48, True)
        assert (unet["depth"], unet["depth_single_blocks"], unet["in_channels"]) == (2, 2, 128)


def test_our_int8_flux2_dev_runs_in_comfyuis_model(comfy, tmp_path):  # noqa: F811
    """Its guidance embedder stays in high precision; dev's guidance reaches the model."""
    source, converted = tiny_file(tmp_path / "flux2-dev.safetensors", "flux2", FLUX2_DEV)
    ours = load_diffusion_model(converted)
    assert int8_layers(ours.model) and not any(n.startswith("guidance_in") for n in int8_layers(ours.model))
    x, sigma, kwargs = model_inputs("flux2")

    def run(model, guidance: float = 3.5) -> torch.Tensor:
        comfy.mm.load_models_gpu([model])
        with torch.inference_mode():
            return model.model.apply_model(x, sigma, **kwargs, guidance=torch.full((2,), guidance)).float()

    reference = run(comfy.sd.load_diffusion_model(str(source)))
    native = run(comfy.sd.load_diffusion_model(str(converted)))
    output = run(ours)
    assert torch.isfinite(output).all() and 0 < error(output, reference) <= ALLOWED * error(native, reference)
    assert error(run(ours, guidance=1.0), output) > 1e-3


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("head", ["conv", "linear"])
def test_comfyui_detects_our_chroma_radiance_and_its_int8_conversion(comfy, tmp_path, prefix, head):  # noqa: F811
    config = {**TINY["chroma_radiance"], "nerf_conv": head == "conv"}
    source, converted = tiny_file(tmp_path / "radiance.safetensors", "chroma_radiance", config, prefix)
    for path, key_prefix in ((source, prefix), (converted, "")):
        model_config = comfy_config(comfy, path, key_prefix)
        assert type(model_config).__name__ == "ChromaRadiance"
        unet = model_config.unet_config
        assert (unet["hidden_size"], unet["in_channels"], unet["patch_size"], unet["nerf_final_head_type"]) == (256, 3, 2, head)
        assert (unet["depth"], unet["depth_single_blocks"], unet["nerf_hidden_size"], unet["nerf_depth"]) == (2, 2, 16, 2)
