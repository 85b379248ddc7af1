"""Per-layer formats in conversion plans, on tiny real-layout checkpoints and full-size headers: which
layers are quantized and which stay in high precision, and what becomes of quantized sources (fp8
dequantized, int8 kept as it is, a mix of formats)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointReader
from engine.models import REGISTRY, detect, detect_tensors
from tests.test_models import assert_same, built, detect_file, headers
from tests.tiny_checkpoints import random_tensors, write_single_file

# --- high precision ---------------------------------------------------------------------------


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
