"""Architecture detection in both layouts (single file and diffusers), on tiny real-layout checkpoints
and full-size headers: the family, release and config, the tensors a conversion plan builds, the
quantized layers of Wan and LTX-2. Also the helpers the other model tests share (test_models_*.py:
per-layer formats, refused files, the diffusers layouts; and diffusers_kwargs, for every test that
builds a diffusers model)."""

from __future__ import annotations

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
    detect,
    detect_tensors,
)
from tests.tiny_checkpoints import (
    every_tiny_variant,
    random_tensors,
    write_diffusers,
    write_single_file,
)

PREFIXES = ("", "diffusion_model.", "model.diffusion_model.")


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


# --- diffusers' constructor arguments (shared with other test files) --------------------------


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
