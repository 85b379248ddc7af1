"""What is not a supported model, and the messages that say so: other kinds of files (text encoders,
LoRAs, VAEs, other diffusion models), empty files, unknown diffusers classes, incomplete or
inconsistent layouts and broken int8 layers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.models import REGISTRY, ModelLayoutError, UnknownModelError, detect_tensors
from tests.test_models import Header, detect_file, headers
from tests.tiny_checkpoints import write_diffusers

SUPPORTED = (
    "supported: Flux.2 (Klein 4B, Klein 9B, dev), Chroma (Chroma1-HD), Chroma Radiance (Radiance), "
    "Z-Image (Turbo/Base), "
    "Flux.1 (dev, schnell, Fill dev, Depth/Canny dev), Qwen-Image (20B), Wan (2.1 T2V 1.3B, "
    "2.1 T2V 14B / 2.2 T2V A14B, 2.1 I2V 14B, 2.1 FLF2V 14B, 2.2 I2V A14B, 2.2 TI2V 5B), LTX-2 (19B (dev, distilled), 2.3 22B (dev, distilled))"
    ", Krea 2 (Raw / Turbo), ERNIE-Image (8B / Turbo), HiDream-O1 (8B (Image, Image-Dev)), Anima (2B (preview))"
)


def write(path, names: list[str]) -> None:
    save_file({n: torch.zeros(2, 2) for n in names}, str(path))


@pytest.mark.parametrize(
    "names,found",
    [
        (
            ["encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight",
             "shared.weight"],
            "it looks like a text encoder (3 tensors, e.g. 'encoder.block.0.layer.0.SelfAttention.q.weight', "
            "'shared.weight')",
        ),
        (
            ["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
             "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"],
            "it looks like a LoRA (2 tensors, "
            "e.g. 'diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight')",
        ),
        (
            ["decoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight", "encoder.conv_in.weight"],
            "it looks like a VAE (3 tensors, e.g. 'decoder.conv_in.weight', 'encoder.conv_in.weight')",
        ),
        (
            [f"input_blocks.{i}.0.weight" for i in range(12)] + ["time_embed.0.weight", "out.2.weight"],
            "found 14 tensors, e.g. 'input_blocks.0.0.weight', 'out.2.weight', 'time_embed.0.weight'",
        ),
    ],
)  # fmt: skip
def test_unknown_models_say_what_they_look_like(tmp_path, names, found):
    write(tmp_path / "x.safetensors", names)
    with pytest.raises(UnknownModelError) as err:
        detect_file(tmp_path / "x.safetensors")
    assert str(err.value) == f"not a supported diffusion model: {found}; {SUPPORTED}"


def test_empty_file(tmp_path):
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(UnknownModelError) as err:
        detect_file(tmp_path / "empty.safetensors")
    assert str(err.value) == f"not a supported diffusion model: the file holds no tensors; {SUPPORTED}"


def test_unknown_diffusers_class(tmp_path):
    folder = write_diffusers(tmp_path / "m", "flux1").path
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(UnknownModelError) as err:
        detect_file(folder)
    assert (
        str(err.value)
        == f"not a supported diffusion model: diffusers class 'SD3Transformer2DModel'; {SUPPORTED}"
    )


def diffusers_headers(arch: str, drop: str = "", add: str = "") -> dict[str, Header]:
    a = REGISTRY[arch]
    shapes = a.diffusers_shapes(a.tiny["tiny"])
    return {n: Header("BF16", s) for n, s in shapes.items() if n != drop} | (
        {add: Header("BF16", (4, 4))} if add else {}
    )


@pytest.mark.parametrize(
    "arch,drop,add,message",
    [
        ("flux2", "transformer_blocks.0.attn.to_k.weight", "",
         "diffusers tensor 'transformer_blocks.0.attn.to_k.weight' is missing (it is part of "
         "'double_blocks.0.img_attn.qkv.weight'): the model is incomplete"),
        ("chroma", "", "controlnet_blocks.0.weight",
         "diffusers tensor 'controlnet_blocks.0.weight' has no counterpart in the Chroma single-file layout: "
         "this variant is not supported"),
        ("zimage", "all_x_embedder.2-1.weight", "",
         "Z-Image model without tensor all_x_embedder.2-1.weight: the file is incomplete"),
    ],
)  # fmt: skip
def test_inconsistent_diffusers_models(arch, drop, add, message):
    with pytest.raises(ModelLayoutError) as err:
        detect_tensors(diffusers_headers(arch, drop, add), {"_class_name": REGISTRY[arch].diffusers_class})
    assert str(err.value) == message


def test_single_file_missing_a_tensor():
    flux2 = REGISTRY["flux2"]
    shapes = {n: s for n, s in flux2.tensor_shapes(flux2.tiny["tiny"]).items() if n != "txt_in.weight"}
    with pytest.raises(ModelLayoutError) as err:
        detect_tensors(headers(shapes, "model.diffusion_model."))
    assert (
        str(err.value)
        == "Flux.2 model without tensor model.diffusion_model.txt_in.weight: the file is incomplete"
    )


def test_broken_int8_layers():
    flux2 = REGISTRY["flux2"]
    shapes = headers(flux2.tensor_shapes(flux2.tiny["tiny"]))
    shapes["single_blocks.0.linear1.weight"] = Header("I8", (576, 64))
    with pytest.raises(ModelLayoutError) as err:
        detect_tensors(shapes)
    assert str(err.value) == (
        "int8 weight 'single_blocks.0.linear1.weight' has no single_blocks.0.linear1.weight_scale: "
        "the file is incomplete"
    )
    shapes["single_blocks.0.linear1.weight_scale"] = Header("F32", (576, 2))
    with pytest.raises(ModelLayoutError) as err:
        detect_tensors(shapes)
    assert str(err.value) == (
        "'single_blocks.0.linear1.weight_scale' has shape [576, 2] for a weight of shape [576, 64]: "
        "only tensor-wise and row-wise scales are supported"
    )


def test_int8_diffusers_is_refused():
    shapes = diffusers_headers("flux2")
    shapes["transformer_blocks.0.attn.to_q.weight"] = Header("I8", (64, 64))
    shapes["transformer_blocks.0.attn.to_q.weight_scale"] = Header("F32", ())
    with pytest.raises(ModelLayoutError) as err:
        detect_tensors(shapes, {"_class_name": "Flux2Transformer2DModel"})
    assert (
        str(err.value)
        == "int8 weights in the diffusers layout are not supported; use a single-file int8 model"
    )
