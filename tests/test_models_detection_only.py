"""Detection-only families of issue 26 (Krea 2, ERNIE-Image, …): tiny files of the real single-file layout, bare and
ComfyUI-prefixed, are read with their config and variant, and a conversion quantizes exactly the
blocks' attention and MLP linears (the generic layout tests in test_models.py run on them too)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from engine.convert import ConvertRequest, run_convert
from engine.models import REGISTRY, detect_tensors
from tests.test_models import detect_file, headers
from tests.tiny_checkpoints import write_single_file

# Per family: the int8 weights a conversion writes (every other tensor stays as the file has it).
QUANTIZED = {
    "krea2": r"blocks\.\d+\.(attn\.(wq|wk|wv|gate|wo)|mlp\.(gate|up|down))\.weight",
    "ernie": r"layers\.\d+\.(self_attention\.(to_q|to_k|to_v|to_out\.0)|mlp\.(gate_proj|up_proj|linear_fc2))\.weight",
}


def int8_weights(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k for k in f.keys() if f.get_slice(k).get_dtype() == "I8"}  # noqa: SIM118


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("arch", QUANTIZED)
def test_files_are_read_and_only_block_linears_converted_to_int8(tmp_path, arch, prefix):
    ckpt = write_single_file(tmp_path / f"{arch}.safetensors", arch, prefix=prefix)
    model = detect_file(ckpt.path)
    assert (model.arch.name, model.prefix, model.config) == (arch, prefix, REGISTRY[arch].tiny["tiny"])
    expected = {n for n in ckpt.reference if re.fullmatch(QUANTIZED[arch], n)}
    assert {t.name for t in model.tensors if t.quantize} == expected
    converted = run_convert(ConvertRequest(ckpt.path, scheme="rowwise", device="cpu")).output
    assert int8_weights(converted) == expected


@pytest.mark.parametrize("arch", QUANTIZED)
def test_released_sizes_are_named_and_read_back(arch):
    a = REGISTRY[arch]
    for variant, config in a.variants.items():
        model = detect_tensors(headers(a.tensor_shapes(config), "model.diffusion_model."))
        assert (model.variant, model.config) == (variant, config)


def test_krea2_released_size():
    """Released as "12.9B": 28 blocks at width 6144, GQA with 12 key/value heads, a 16384-wide SwiGLU
    (12.8B in the transformer's file)."""
    krea2 = REGISTRY["krea2"]
    shapes = krea2.tensor_shapes(krea2.variants["Raw / Turbo"])
    assert round(sum(torch.Size(s).numel() for s in shapes.values()) / 1e9, 1) == 12.8
    assert (shapes["blocks.0.attn.wk.weight"], shapes["blocks.27.mlp.down.weight"]) == ((1536, 6144), (6144, 16384))
