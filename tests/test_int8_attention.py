"""8-bit attention (``kernels.quantized_attention``, ``int8_attention``): the kernel against float64, in the
interpreter on CPU tensors and on the GPU (marker ``gpu``); the PyTorch emulation of its rounding that
benchmarks run in models; the fallback; torch.compile.

Each test draws fresh random inputs from a seed it names in its failure message: rerun one with
``ATTENTION_SEED=<seed>``.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from engine.int8 import kernels, ops
from engine.int8.attention import int8_attention
from engine.int8.kernels.attention import FP8_MAX, KEY_BLOCK, QUERY_BLOCK, AttentionTiles
from engine.int8.operands import attention_output
from tests.int8_reference import (
    DEVICES,
    NEEDS_INTERPRETER,
    ULP,
    attention_emulation,
    attention_reference,
    interpreter_bfloat16,
    quantize_blocks_reference,
)

ERROR_BUDGET = 0.02
"""Relative L2 error of 8-bit attention against exact attention on random normal q, k, v (scores of unit
variance): the int8 rounding of q and k moves each score by about 1 % of its spread, and the output by
about as much; measured 1.1–1.4 % at head dims 64 and 128, float16 and bfloat16 alike."""
FP8_PV_BUDGET = 0.05
"""The same with ``P V`` in float8 e4m3 (``fp8_pv``): 3.3–3.7 % measured. Its 3-bit mantissa rounds each
value of V and P by up to 6 %; on random inputs attention is nearly uniform, its output a mean of many
values of V, as small as their rounding errors' mean (trained models' attention is peakier)."""
OUTLIER_OFFSET = 20.0
"""Scale of the per-channel offset added to every key in the outlier test: what real models' keys show
(a few channels far from zero in every token), and what smoothing takes away."""


def needs_fp8_mma(device: str) -> None:
    """Skip on a GPU without float8 MMA (before compute capability 8.9); the interpreter emulates it."""
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 P V needs a GPU of compute capability 8.9 or newer")


@pytest.fixture
def seed() -> int:
    seed = int(os.environ.get("ATTENTION_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    return seed


def qkv(shape, dtype, device, key_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random normal q, k, v; keys shifted by ``key_offset`` times a random vector per head."""
    q, k, v = torch.randn(3, *shape)
    k = k + key_offset * torch.randn(*shape[:2], 1, shape[3])
    return tuple(t.to(device, dtype) for t in (q, k, v))


def relative_error(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out.double().cpu() - want).norm() / want.norm()).item()


def exact_attention(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(*(t.double().cpu() for t in (q, k, v)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37, 130])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_against_the_float64_reference_of_its_quantization(device, dtype, tokens, head_dim, seed):
    """Off the reference by P's rounding to the inputs' dtype before ``P V`` and the output's rounding:
    each within one unit in the last place of the largest value."""
    q, k, v = qkv((2, 3, tokens, head_dim), dtype, device)
    out = kernels.quantized_attention(q, k, v, head_dim**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    want = attention_reference(q, k, v, head_dim**-0.5, QUERY_BLOCK, KEY_BLOCK)
    bound = ULP[dtype] * v.double().cpu().abs().amax(dim=(2, 3), keepdim=True) + 1e-6
    err = (out.double().cpu() - want).abs()
    assert (err <= bound).all(), f"seed {seed}: error {(err / bound).max():.2f}× the bound"
    error = relative_error(out, exact_attention(q, k, v))
    assert error < ERROR_BUDGET, f"seed {seed}: relative error {error:.4f} against exact attention"


@NEEDS_INTERPRETER
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, head_dim", [(37, 128), (130, 64), (259, 128)])
@pytest.mark.parametrize("fp8_pv", [False, True])
def test_emulation_reproduces_the_kernels_rounding(dtype, tokens, head_dim, fp8_pv, seed):
    """The emulation is the kernel up to float32 summation order: nearly every output bit for bit, 1e-4 off
    at most (the float64 reference, which skips P's rounding, is 3e-4 to 5e-3 off). In bfloat16 it rounds
    as the interpreter does (truncating; the GPU, like the emulation's default, rounds to nearest). Two
    heads at a time: the chunking is exercised on three."""
    q, k, v = qkv((2, 3, tokens, head_dim), dtype, "cpu", key_offset=5.0)
    out = kernels.quantized_attention(q, k, v, head_dim**-0.5, fp8_pv=fp8_pv).double()
    to_half = interpreter_bfloat16 if dtype == torch.bfloat16 else None
    emulated = attention_emulation(q, k, v, head_dim**-0.5, heads=2, to_half=to_half, fp8_pv=fp8_pv).double()
    same = (emulated == out).double().mean().item()
    assert relative_error(emulated, out) < 1e-4 and same > 0.99, f"seed {seed}: {same:.2%} equal"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, head_dim", [(1, 64), (37, 128), (300, 128)])
def test_fp8_pv_against_exact_attention_and_the_emulation(device, dtype, tokens, head_dim, seed):
    """``P V`` in float8: within its budget of exact attention, and (on the GPU, whose fp8 cast the
    interpreter replaces by arithmetic) the emulation's rounding up to summation order and exp2's bits."""
    needs_fp8_mma(device)
    q, k, v = qkv((2, 3, tokens, head_dim), dtype, device, key_offset=5.0)
    out = kernels.quantized_attention(q, k, v, head_dim**-0.5, fp8_pv=True)
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    error = relative_error(out, exact_attention(q, k, v))
    assert error < FP8_PV_BUDGET, f"seed {seed}: relative error {error:.4f} against exact attention"
    to_half = interpreter_bfloat16 if dtype == torch.bfloat16 and device == "cpu" else None  # as it rounds
    emulated = attention_emulation(*(t.cpu() for t in (q, k, v)), head_dim**-0.5, to_half=to_half, fp8_pv=True)
    emulated = emulated.double()
    assert relative_error(out, emulated) < (1e-4 if device == "cpu" else 2e-3), f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8_pv", [False, True])
def test_other_tiles_attend_within_the_budget(device, fp8_pv, seed):
    """Launches ``benchmarks/attention.py --sweep`` times: other tile sizes quantize q and k in other blocks,
    the error stays that of the default's."""
    if fp8_pv:
        needs_fp8_mma(device)
    q, k, v = qkv((1, 2, 150, 64), torch.bfloat16, device, key_offset=5.0)
    want = exact_attention(q, k, v)
    budget = FP8_PV_BUDGET if fp8_pv else ERROR_BUDGET
    for tiles in (AttentionTiles(64, 128, 4, 2), AttentionTiles(128, 128, 8, 3), AttentionTiles(64, 64, 4, 4)):
        error = relative_error(kernels.quantized_attention(q, k, v, 64**-0.5, fp8_pv=fp8_pv, tiles=tiles), want)
        assert error < budget, f"seed {seed}: {tiles} error {error:.4f}"


def test_values_quantize_per_channel_to_float8():
    v = torch.randn(2, 3, 50, 64, dtype=torch.bfloat16) * (torch.rand(1, 3, 1, 64, dtype=torch.bfloat16) + 0.1) * 10
    v8, factor = kernels.quantize_values(v)
    assert v8.dtype == torch.float8_e4m3fn and v8.shape == v.shape and v8.transpose(2, 3).is_contiguous()
    assert factor.shape == (2, 3, 64) and factor.dtype == torch.float32
    scale = factor * FP8_MAX  # each channel's absmax / 448
    assert torch.equal(v8.float().abs().amax(dim=2), torch.full((2, 3, 64), FP8_MAX))
    # each value within half a step of e4m3's 3-bit mantissa (or of its subnormals' spacing)
    err = (v8.float() * scale[:, :, None] - v.float()).abs()
    assert (err <= v.float().abs() * 2**-4 + scale[:, :, None] * 2**-10 + 1e-30).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("smooth", [True, False])
def test_block_quantization_matches_reference_bit_for_bit(device, smooth, seed):
    x = qkv((2, 2, 70, 64), torch.bfloat16, device, key_offset=OUTLIER_OFFSET)[1]
    q, scale = kernels.quantize_blocks(x, 32, smooth=smooth)
    q_ref, scale_ref = quantize_blocks_reference(x, 32, smooth)
    assert torch.equal(q.double().cpu(), q_ref), f"seed {seed}"
    assert torch.equal(scale.double().cpu().repeat_interleave(32, 2)[:, :, :70], scale_ref), f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_smoothing_keeps_key_outliers_from_costing_precision(device, seed):
    """Keys sharing a large offset per channel: quantized as they are, the int8 grid spends its steps on
    the offset (several times the budget); smoothed, the error is that of keys without it."""
    q, k, v = qkv((2, 2, 130, 128), torch.bfloat16, device, key_offset=OUTLIER_OFFSET)
    want = exact_attention(q, k, v)
    smoothed = relative_error(kernels.quantized_attention(q, k, v, 128**-0.5), want)
    raw = relative_error(kernels.quantized_attention(q, k, v, 128**-0.5, smooth_k=False), want)
    assert smoothed < ERROR_BUDGET and raw > 5 * smoothed, f"seed {seed}: {smoothed:.4f} smoothed, {raw:.4f} raw"


@pytest.mark.parametrize("backend", ["torch", "int_mm"])
def test_other_backends_run_sdpa_in_the_kernels_layout(backend, seed):
    q, k, v = qkv((2, 3, 37, 64), torch.bfloat16, "cpu")
    with ops.use_backend(backend):
        out = int8_attention(q, k, v, 0.1)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=0.1)), f"seed {seed}"
    assert out.stride() == attention_output(q).stride()


@NEEDS_INTERPRETER
def test_the_op_runs_the_kernel_on_the_triton_backend(seed):
    q, k, v = (t.transpose(1, 2) for t in qkv((2, 37, 3, 64), torch.float16, "cpu"))  # strided, as models split heads
    with ops.use_backend("triton"):
        out = int8_attention(q, k, v)
    assert torch.equal(out, kernels.quantized_attention(q, k, v, 64**-0.5)), f"seed {seed}"


@pytest.mark.parametrize(
    "q_shape, dtype",
    [((2, 37, 64), torch.bfloat16), ((1, 2, 37, 96), torch.bfloat16), ((1, 2, 37, 64), torch.float32)],
)
def test_bad_inputs_are_refused(q_shape, dtype):
    with pytest.raises(ValueError, match="q must be"):
        int8_attention(*(torch.zeros(q_shape, dtype=dtype) for _ in range(3)))
    with pytest.raises(ValueError, match="one shape and dtype"):
        shorter = torch.zeros(1, 2, 36, 64, dtype=torch.float16)
        int8_attention(torch.zeros(1, 2, 37, 64, dtype=torch.float16), shorter, shorter)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_compiled_attention_has_no_graph_breaks_and_no_recompiles(backend, seed):
    def block(x: torch.Tensor) -> torch.Tensor:
        q, k, v = x.unflatten(-1, (3, 2, 64)).permute(2, 0, 3, 1, 4)
        return int8_attention(q, k, v).transpose(1, 2).flatten(2) + x[..., :128]

    torch._dynamo.reset()
    with ops.use_backend(backend):
        explanation = torch._dynamo.explain(block)(torch.randn(1, 8, 384, dtype=torch.bfloat16))
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        assert explanation.graphs[0].code.count("int8_studio.attention") == 1

        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(block, backend=counter, fullgraph=True)
        for tokens in (8, 13, 40):
            x = torch.randn(1, tokens, 384, dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")
        assert counter.frame_count == 1
