"""Architecture detection, key layouts and conversion plans, on tiny real-layout checkpoints."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointError, CheckpointReader, format_bytes
from engine.models import (
    REGISTRY,
    DetectedModel,
    ModelLayoutError,
    Piece,
    UnknownModelError,
    detect,
    detect_tensors,
)
from tests.tiny_checkpoints import (
    every_tiny_variant,
    random_tensors,
    to_diffusers,
    write_diffusers,
    write_single_file,
)

PREFIXES = ("", "diffusion_model.", "model.diffusion_model.")
SUPPORTED = (
    "supported: Flux.2 (Klein 4B, Klein 9B, dev), Chroma (Chroma1-HD), Chroma Radiance (Radiance), "
    "Z-Image (Turbo/Base), "
    "Flux.1 (dev, schnell, Fill dev, Depth/Canny dev), Qwen-Image (20B), Wan (2.1 T2V 1.3B, "
    "2.1 T2V 14B / 2.2 T2V A14B, 2.1 I2V 14B, 2.1 FLF2V 14B, 2.2 I2V A14B, 2.2 TI2V 5B), LTX-2 (19B (dev, distilled), 2.3 22B (dev, distilled))"
    ", Krea 2 (Raw / Turbo), ERNIE-Image (8B / Turbo), HiDream-O1 (8B (Image, Image-Dev)), Anima (2B (preview))"
)
# The blocks whose 2-D weights are quantized; everything else stays in high precision.
QUANTIZED_BLOCKS = {
    "flux2": ("double_blocks.", "single_blocks."),
    "chroma": ("double_blocks.", "single_blocks."),
    "chroma_radiance": ("double_blocks.", "single_blocks."),
    "flux1": ("double_blocks.", "single_blocks."),
    "zimage": ("layers.",),
    "qwen_image": ("transformer_blocks.",),
    "wan": ("blocks.",),
    "ltx2": ("transformer_blocks.",),
    "krea2": ("blocks.",),
    "ernie": ("layers.",),
    "hidream_o1": ("language_model.layers.",),
    "anima": ("blocks.",),
}


@dataclass
class Header:
    dtype: str
    shape: tuple[int, ...]


def headers(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, Header]:
    return {prefix + n: Header("BF16", s) for n, s in shapes.items()}


def built(model: DetectedModel, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every output tensor, built from the reader as a converter would."""
    out = {}
    for t in model.tensors:
        tensor = t.build([reader.get(s) for s in t.sources])
        assert (tensor.dtype, tuple(tensor.shape)) == (t.dtype, t.shape), t.name
        out[t.name] = tensor
    return out


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def detect_file(path) -> DetectedModel:
    with CheckpointReader(path) as reader:
        return detect(reader)


# --- detection in both layouts ------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("arch,variant", every_tiny_variant())
def test_single_file_detected_and_planned(tmp_path, arch, variant, prefix):
    ckpt = write_single_file(tmp_path / "model.safetensors", arch, variant, prefix=prefix)
    with CheckpointReader(ckpt.path) as reader:
        model = detect(reader)
        assert_same(built(model, reader), ckpt.reference)
    detected = (model.arch.name, model.variant, model.layout, model.prefix)
    assert detected == (arch, "custom", "single-file", prefix)
    assert model.source_format == "bf16"
    assert model.config == ckpt.config
    assert all(s.startswith(prefix) for t in model.tensors for s in t.sources)
    assert model.layer_formats == {} and model.other_tensors == ()


@pytest.mark.parametrize("arch,variant", every_tiny_variant(diffusers=True))
def test_diffusers_plan_equals_single_file(tmp_path, arch, variant):
    tensors = random_tensors(arch, variant)
    single = detect_file(
        write_single_file(tmp_path / "model.safetensors", arch, variant, tensors=tensors).path
    )
    folder = write_diffusers(tmp_path / "diffusers", arch, variant, tensors=tensors).path
    for path in (folder, folder / "transformer"):
        with CheckpointReader(path) as reader:
            model = detect(reader)
            output = built(model, reader)
        detected = (model.arch.name, model.variant, model.layout, model.prefix)
        assert detected == (arch, "custom", "diffusers", "")
        assert model.config == single.config
        # Z-Image's unused norm_final has no diffusers counterpart: it is its module's initial value,
        # ones (a complete file, as ComfyUI and our loader want); everything else is identical.
        expected = {n: torch.ones_like(t) if (arch, n) == ("zimage", "norm_final.weight") else t
                    for n, t in tensors.items()}  # fmt: skip
        assert_same(output, expected)
        quantized = {t.name for t in model.tensors if t.quantize}
        assert quantized == {t.name for t in single.tensors if t.quantize}


@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.float32, "fp32")])
def test_float_source_formats(tmp_path, dtype, name):
    ckpt = write_single_file(tmp_path / "m.safetensors", "zimage", dtype=dtype)
    model = detect_file(ckpt.path)
    assert model.source_format == name
    assert {t.dtype for t in model.tensors} == {dtype}


@pytest.mark.parametrize("arch", ["flux2", "flux1"])
def test_full_checkpoint_keeps_other_models_apart(tmp_path, arch):
    """A ComfyUI "checkpoint" file: the diffusion model beside its VAE and text encoders."""
    vae = {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
           "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8)}  # fmt: skip
    ckpt = write_single_file(tmp_path / "m.safetensors", arch, prefix="model.diffusion_model.", extra=vae)
    model = detect_file(ckpt.path)
    assert (model.arch.name, model.prefix) == (arch, "model.diffusion_model.")
    assert model.other_tensors == tuple(sorted(vae))
    assert {t.name for t in model.tensors} == set(ckpt.reference)


@pytest.mark.parametrize("arch", REGISTRY)
def test_released_variants_from_full_size_headers(arch):
    a = REGISTRY[arch]
    for variant, config in a.variants.items():
        for prefix in PREFIXES:
            model = detect_tensors(headers(a.tensor_shapes(config), prefix))
            assert (model.arch, model.variant, model.layout) == (a, variant, "single-file")
        if not a.diffusers_class:
            continue
        model = detect_tensors(headers(a.diffusers_shapes(config)), {"_class_name": a.diffusers_class})
        assert (model.arch, model.variant, model.layout) == (a, variant, "diffusers")
        assert model.config == config


def test_variant_with_fewer_blocks_is_named():
    flux2 = REGISTRY["flux2"]
    pruned = {**flux2.variants["Klein 9B"], "single_blocks": 6}
    model = detect_tensors(headers(flux2.tensor_shapes(pruned)))
    assert model.variant == "Klein 9B with 8 double blocks, 6 single blocks"


def test_guidance_tells_flux1_dev_from_schnell():
    flux1 = REGISTRY["flux1"]
    dev = flux1.tensor_shapes(flux1.variants["dev"])
    schnell = {n: s for n, s in dev.items() if not n.startswith("guidance_in.")}
    assert detect_tensors(headers(schnell)).variant == "schnell"


@pytest.mark.parametrize("arch", ["flux2", "chroma", "zimage", "flux1"])
def test_diffusers_names_in_a_lone_file_are_detected(tmp_path, arch):
    ckpt = write_diffusers(tmp_path / "model", arch)
    save_file({n: t.contiguous() for n, t in ckpt.tensors.items()}, str(tmp_path / "flat.safetensors"))
    with CheckpointReader(tmp_path / "flat.safetensors") as reader:
        model = detect(reader)
        assert_same(built(model, reader), ckpt.reference)
    assert (model.arch.name, model.layout) == (arch, "diffusers")


WAN_QUANTIZED = r"blocks\.\d+\.((self|cross)_attn\.(q|k|v|o|k_img|v_img)|ffn\.(0|2))\.weight"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("variant", ["tiny", "tiny-i2v"])
def test_wan_files_are_read_and_only_block_linears_quantized(tmp_path, prefix, variant):
    """A Wan file (ComfyUI/original names): its config from the shapes, the CLIP image embedder and
    FLF2V's frame positions told apart, and int8 for the blocks' attention and FFN linears alone (the
    Conv3d patch embedding, the embedders, the time projection and the head stay)."""
    ckpt = write_single_file(tmp_path / "wan.safetensors", "wan", variant, prefix=prefix)
    model = detect_file(ckpt.path)
    assert (model.arch.name, model.prefix, model.config) == ("wan", prefix, REGISTRY["wan"].tiny[variant])
    quantized = {t.name for t in model.tensors if t.quantize}
    assert quantized == {n for n in ckpt.reference if re.fullmatch(WAN_QUANTIZED, n)}
    assert any("k_img" in n for n in quantized) == (variant == "tiny-i2v")


def test_wan_releases_are_told_apart():
    """What tells the releases apart, as ComfyUI tells them: width, latent channels (the 5B's 48, an
    image-to-video model's 36) and Wan 2.1's CLIP image embedder."""
    wan = REGISTRY["wan"]
    found = {detect_tensors(headers(wan.tensor_shapes(c), "model.diffusion_model.")).variant for c in wan.variants.values()}
    assert found == set(wan.variants)
    expert = {**wan.variants["2.2 I2V A14B"], "layers": 20}
    assert detect_tensors(headers(wan.tensor_shapes(expert))).variant == "2.2 I2V A14B with 20 layers"


LTX2_QUANTIZED = (
    r"transformer_blocks\.\d+\.((audio_)?attn[12]|audio_to_video_attn|video_to_audio_attn)\.(to_[qkv]|to_out\.0)\.weight"
    r"|transformer_blocks\.\d+\.(audio_)?ff\.net\.(0\.proj|2)\.weight"
)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("variant", ["tiny", "tiny-2.3"])
def test_ltx2_files_are_read_and_only_block_linears_quantized(tmp_path, prefix, variant):
    """An LTX-2 or LTX-2.3 file (ComfyUI names): its config from the shapes, and int8 for the blocks' six
    attentions and two FFNs alone (patchifiers, adaLN-singles, caption projections, text connectors,
    2.3's attention gates and output heads stay); the releases' shapes read as the 19B and the 2.3 22B."""
    ckpt = write_single_file(tmp_path / "ltx2.safetensors", "ltx2", variant, prefix=prefix)
    model = detect_file(ckpt.path)
    assert (model.arch.name, model.prefix, model.config) == ("ltx2", prefix, REGISTRY["ltx2"].tiny[variant])
    quantized = {t.name for t in model.tensors if t.quantize}
    assert quantized == {n for n in ckpt.reference if re.fullmatch(LTX2_QUANTIZED, n)}
    assert len(quantized) == 2 * (6 * 4 + 2 * 2)
    ltx2 = REGISTRY["ltx2"]
    for name, config in ltx2.variants.items():
        assert detect_tensors(headers(ltx2.tensor_shapes(config), "model.diffusion_model.")).variant == name


def test_a_truncated_wan_file_says_so(tmp_path):
    ckpt = write_single_file(tmp_path / "wan.safetensors", "wan")
    size = ckpt.path.stat().st_size
    os.truncate(ckpt.path, size - 100)
    with pytest.raises(CheckpointError) as err:
        detect_file(ckpt.path)
    assert str(err.value) == (
        f"{ckpt.path} is truncated: the header says the data ends at {format_bytes(size)}, "
        f"the file has {format_bytes(size - 100)}; download or export it again"
    )


def test_a_wan_file_without_its_head():
    wan = REGISTRY["wan"]
    shapes = {n: s for n, s in wan.tensor_shapes(wan.tiny["tiny"]).items() if n != "head.head.weight"}
    with pytest.raises(ModelLayoutError) as err:
        detect_tensors(headers(shapes, "model.diffusion_model."))
    assert str(err.value) == "Wan model without tensor model.diffusion_model.head.head.weight: the file is incomplete"


# --- high precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", REGISTRY)
def test_only_block_linears_are_quantized(arch):
    a = REGISTRY[arch]
    configs = [*a.variants.values(), *a.tiny.values()]
    for config in configs:
        shapes = a.tensor_shapes(config)
        model = detect_tensors(headers(shapes))
        quantized = {t.name for t in model.tensors if t.quantize}
        expected = {
            n
            for n, s in shapes.items()
            if n.startswith(QUANTIZED_BLOCKS[arch]) and n.endswith(".weight") and len(s) == 2
            and ".adaln_modulation" not in n.lower() and "_mod." not in n and ".modulation." not in n
            and ".to_gate_logits." not in n  # LTX-2.3's per-head gates: one output per head
        }  # fmt: skip
        assert quantized == expected
        assert not any(n.endswith(".bias") or len(shapes[n]) != 2 for n in quantized)


def test_degenerate_weights_stay_high_precision():
    flux2 = REGISTRY["flux2"]
    assert flux2.keeps_high_precision("double_blocks.0.img_attn.proj.weight", (1, 4096))
    assert flux2.keeps_high_precision("double_blocks.0.img_attn.proj.weight", (4096, 15))
    assert not flux2.keeps_high_precision("double_blocks.0.img_attn.proj.weight", (4096, 16))
    assert flux2.keeps_high_precision("double_blocks.0.img_attn.norm.query_norm.scale", (128,))


# --- key layouts as data --------------------------------------------------------------------------


def test_pieces_give_explicit_rows():
    flux2, flux1 = REGISTRY["flux2"], REGISTRY["flux1"]
    klein = flux2.variants["Klein 9B"]
    assert flux2.diffusers_pieces("final_layer.adaLN_modulation.1.weight", klein) == (
        Piece("norm_out.linear.weight", slice(4096, 8192)),
        Piece("norm_out.linear.weight", slice(0, 4096)),
    )
    assert flux2.diffusers_pieces("double_blocks.3.txt_attn.qkv.weight", klein) == tuple(
        Piece(f"transformer_blocks.3.attn.add_{x}_proj.weight", slice(0, 4096)) for x in "qkv"
    )
    assert flux1.diffusers_pieces("single_blocks.7.linear1.bias", flux1.variants["dev"]) == (
        *(Piece(f"single_transformer_blocks.7.attn.to_{x}.bias", slice(0, 3072)) for x in "qkv"),
        Piece("single_transformer_blocks.7.proj_mlp.bias", slice(0, 12288)),
    )
    assert REGISTRY["zimage"].diffusers_pieces("norm_final.weight", {}) == ()


@pytest.mark.parametrize("arch", REGISTRY)
def test_mapping_is_invertible(arch):
    a = REGISTRY[arch]
    config = next(iter(a.variants.values()))
    for name in a.tensor_shapes(config):
        for piece in a.diffusers_pieces(name, config):
            assert a.single_file_name(piece.name) == name


# --- quantized sources --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8_scaled", "fp8_comfy_quant"])
@pytest.mark.parametrize("arch", REGISTRY)
def test_fp8_is_dequantized_and_markers_dropped(tmp_path, arch, fmt):
    ckpt = write_single_file(tmp_path / "m.safetensors", arch, prefix="diffusion_model.", fmt=fmt)
    with CheckpointReader(ckpt.path) as reader:
        model = detect(reader)
        assert_same(built(model, reader), ckpt.reference)
    assert model.source_format == "fp8_scaled"
    fp8_weights = {n for n, t in ckpt.tensors.items() if t.dtype == torch.float8_e4m3fn and t.numel()}
    assert {f"{model.prefix}{layer}.weight" for layer in model.layer_formats} == fp8_weights
    assert set(model.layer_formats.values()) == {"fp8_scaled"}
    planned = {t.name: t for t in model.tensors}
    assert all(planned[n.removeprefix(model.prefix)].quantize for n in fp8_weights)
    assert all(planned[n.removeprefix(model.prefix)].dtype == torch.bfloat16 for n in fp8_weights)


def test_unscaled_fp8_is_cast(tmp_path):
    tensors = random_tensors("flux2")
    name = "single_blocks.0.linear1.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    ckpt = write_single_file(tmp_path / "m.safetensors", "flux2", tensors=tensors)
    with CheckpointReader(ckpt.path) as reader:
        model = detect(reader)
        output = built(model, reader)
    assert model.source_format == "fp8" and model.layer_formats == {name.removesuffix(".weight"): "fp8"}
    assert torch.equal(output[name], tensors[name].to(torch.bfloat16))


@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise"])
def test_int8_is_kept_as_is(tmp_path, scheme):
    ckpt = write_single_file(tmp_path / "m.safetensors", "chroma", fmt=f"int8_{scheme}")
    with CheckpointReader(ckpt.path) as reader:
        model = detect(reader)
        assert_same(built(model, reader), ckpt.reference)
    assert model.source_format == f"int8_{scheme}"
    assert set(model.layer_formats.values()) == {f"int8_{scheme}"}
    assert not any(t.quantize for t in model.tensors)


def test_mixed_formats(tmp_path):
    tensors = random_tensors("qwen_image")
    name = "transformer_blocks.0.attn.to_q.weight"
    tensors[name] = tensors[name].float()
    assert (
        detect_file(
            write_single_file(tmp_path / "a.safetensors", "qwen_image", tensors=tensors).path
        ).source_format
        == "mixed"
    )
    int8 = write_single_file(tmp_path / "b.safetensors", "qwen_image", fmt="int8_rowwise").tensors
    fp8 = write_single_file(tmp_path / "c.safetensors", "qwen_image", fmt="fp8_comfy_quant").tensors
    layer = "transformer_blocks.1.attn.to_q"
    both = {**int8, **{n: t for n, t in fp8.items() if n.startswith(layer + ".")}}
    both.pop(f"{layer}.comfy_quant")
    save_file({n: t.contiguous() for n, t in both.items()}, str(tmp_path / "d.safetensors"))
    model = detect_file(tmp_path / "d.safetensors")
    assert model.source_format == "mixed"
    assert model.layer_formats[layer] == "fp8_scaled"


# --- what is not a supported model ---------------------------------------------------------------


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


# --- the facts, checked against diffusers itself -------------------------------------------------


def test_diffusers_layouts_match_the_diffusers_classes():
    import diffusers

    for a in (a for a in REGISTRY.values() if a.diffusers_class):
        for config in a.variants.values():
            with torch.device("meta"):
                model = getattr(diffusers, a.diffusers_class)(**diffusers_kwargs(a.name, config))
            expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
            assert a.diffusers_shapes(config) == expected, a.name


@pytest.mark.parametrize("arch,converter", [("flux2", "flux2"), ("zimage", "z_image")])
def test_split_matches_the_diffusers_converter(arch, converter):
    from diffusers.loaders import single_file_utils

    convert = getattr(single_file_utils, f"convert_{converter}_transformer_checkpoint_to_diffusers")
    for variant, config in REGISTRY[arch].tiny.items():
        tensors = random_tensors(arch, variant)
        assert_same(to_diffusers(arch, tensors, config), convert(dict(tensors)))


def diffusers_kwargs(arch: str, c) -> dict:
    """The diffusers constructor arguments of one of our configs."""
    if arch == "wan":
        return dict(
            num_attention_heads=c["dim"] // 128, attention_head_dim=128, in_channels=c["in_channels"],
            out_channels=c["out_channels"], text_dim=c["text_dim"], ffn_dim=c["ffn_dim"], num_layers=c["layers"],
            image_dim=c["image_dim"] or None, added_kv_proj_dim=c["dim"] if c["image_dim"] else None,
            pos_embed_seq_len=c["image_tokens"] or None,
        )  # fmt: skip
    if arch == "ernie":
        return dict(
            hidden_size=c["hidden"], num_attention_heads=c["heads"], num_layers=c["layers"], ffn_hidden_size=c["ffn"],
            in_channels=c["in_channels"], out_channels=c["out_channels"], patch_size=c["patch"], text_in_dim=c["text_dim"],
        )  # fmt: skip
    heads = c.get("hidden", c.get("dim", 0)) // c["head_dim"]
    rope3 = (c["head_dim"] // 8, c["head_dim"] * 7 // 16, c["head_dim"] * 7 // 16)
    flux = dict(
        patch_size=1, in_channels=c.get("in_channels"), num_layers=c.get("double_blocks"),
        num_single_layers=c.get("single_blocks"), attention_head_dim=c["head_dim"], num_attention_heads=heads,
        joint_attention_dim=c.get("text_dim"),
    )  # fmt: skip
    if arch == "flux2":
        return flux | dict(mlp_ratio=c["mlp_hidden"] / c["hidden"], guidance_embeds=c["guidance"])
    if arch == "chroma":
        return flux | dict(
            approximator_num_channels=c["approximator_in"], approximator_hidden_dim=c["approximator_hidden"],
            approximator_layers=c["approximator_layers"], axes_dims_rope=rope3,
        )  # fmt: skip
    if arch == "flux1":
        return flux | dict(out_channels=c["out_channels"], pooled_projection_dim=c["vec_dim"],
                           guidance_embeds=c["guidance"], axes_dims_rope=rope3)  # fmt: skip
    if arch == "zimage":
        return dict(
            in_channels=c["patch_in"] // 4, dim=c["dim"], n_layers=c["layers"],
            n_refiner_layers=c["refiner_layers"], n_heads=heads, n_kv_heads=heads, cap_feat_dim=c["cap_dim"],
            axes_dims=[c["head_dim"] // 4, c["head_dim"] * 3 // 8, c["head_dim"] * 3 // 8],
        )  # fmt: skip
    return dict(
        patch_size=2, in_channels=c["in_channels"], out_channels=c["out_channels"] // 4,
        num_layers=c["layers"], attention_head_dim=c["head_dim"], num_attention_heads=heads,
        joint_attention_dim=c["text_dim"], axes_dims_rope=rope3,
    )  # fmt: skip
