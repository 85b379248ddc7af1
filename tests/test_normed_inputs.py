"""Projection inputs given before their norm and modulation (``fusion.NormedInput``): the Triton backend
normalizes, modulates and quantizes each row in one kernel, eager and compiled."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from engine import fusion
from engine.int8 import kernels, ops
from engine.int8.linear import Int8Linear
from engine.models import layers
from tests.int8_reference import (
    BACKENDS,
    DEVICES,
    NEEDS_INTERPRETER,
    ULP,
    assert_within_int8_rounding,
)


def make_input(norm, batch, tokens, width, dtype, device, weight=True, scale=True, shift=True) -> fusion.NormedInput:
    """Rows of very different offsets and spreads; per-sample modulation vectors [batch, 1, width]."""
    spread = torch.rand(batch, tokens, 1) * 8 + 0.1
    x = (torch.randn(batch, tokens, width) * spread + torch.randn(batch, tokens, 1) * 4).to(dtype).to(device)

    def vector(scale, offset):
        return (torch.randn(batch, 1, width) * scale + offset).to(dtype).to(device)

    return fusion.NormedInput(
        x, norm, 1e-6,
        weight=(torch.rand(width) + 0.5).to(dtype).to(device) if weight else None,
        scale=vector(0.3, 0.0) if scale else None,
        shift=vector(1.0, 0.0) if shift else None,
    )  # fmt: skip


def float64_tokens(x: fusion.NormedInput) -> tuple[torch.Tensor, torch.Tensor]:
    """The input's tokens in float64, rounded to its dtype where the unfused ops round (after the norm and
    after the modulation), and the size of each value's rounding error in ulps of the dtype (a rounding
    of the norm's output is scaled by ``1 + scale``, itself rounded to the scale's dtype)."""
    v = x.x.double()
    if x.norm == "layer":
        v = v - v.mean(dim=-1, keepdim=True)
    y = v / (v.pow(2).mean(dim=-1, keepdim=True) + x.eps).sqrt()
    if x.weight is not None:
        y = y * x.weight.double()
    y = y.to(x.x.dtype).double()
    if x.scale is not None:
        y = y * (1 + x.scale).double()
    ulps = y.abs()
    if x.shift is not None:
        y = y + x.shift.double()
    y = y.to(x.x.dtype).double()
    return y.reshape(-1, x.width), (ulps + y.abs()).reshape(-1, x.width)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ops.NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, tokens, width", [(1, 1, 40), (2, 17, 300), (3, 5, 1000)])
@pytest.mark.parametrize("parts", ["weight,scale,shift", "scale", ""])
def test_normed_quantization_against_float64(device, norm, dtype, batch, tokens, width, parts):
    x = make_input(norm, batch, tokens, width, dtype, device, *(p in parts.split(",") for p in ("weight", "scale", "shift")))
    q, scale = kernels.quantize_normed_tokens(*ops.normed_tokens(x))
    ref, ulps = (t.cpu() for t in float64_tokens(x))
    q, scale = q.cpu().double(), scale.cpu().double()[:, None]
    assert q.shape == ref.shape and q.abs().max() <= 127
    # two roundings to the input dtype, each off by up to a full ulp (the interpreter truncates its casts;
    # seen: 1.1 ulps), and the row's absmax with them; float32: the norm's statistics (a row's mean can be
    # 100× its spread here)
    slack = 2 * max(ULP[dtype], 2**-16) * ulps
    assert ((scale * 127 - ref.abs().amax(dim=1, keepdim=True)).abs() <= slack.amax(dim=1, keepdim=True)).all()
    assert ((q * scale - ref).abs() <= scale * (0.5 + 1e-5) + slack + 1e-30).all()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("norm", ops.NORMS)
def test_int8_linear_of_a_normed_input_is_within_int8_rounding(backend, device, norm):
    x = make_input(norm, 2, 9, 320, torch.bfloat16, device)
    n = 40
    w_int8 = torch.randint(-127, 128, (n, x.width), dtype=torch.int8, device=device)
    w_scale = (torch.rand(n, 1, device=device) + 0.5) / 127 / x.width**0.5
    bias = torch.randn(n, device=device)
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, w_scale, bias, out_dtype=torch.float32)
    assert out.shape == (2, 9, n)
    assert_within_int8_rounding(out.reshape(-1, n), float64_tokens(x)[0].float(), w_int8, w_scale, bias)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_what_the_kernel_does_not_fuse_is_materialized_first(backend, device):
    """A rotated weight and a per-token modulation take the unfused path: the same output as the
    materialized input, exactly. A LoRA does not: its term comes from the fused path's int8 tokens."""
    x = make_input("rms", 2, 7, 256, torch.bfloat16, device)
    per_token = x._replace(scale=x.scale.expand(2, 7, 256).contiguous())
    assert ops.normed_tokens(per_token) is None
    # [2, 256] against [2, 2, 256] broadcasts per token, not per sample
    assert ops.normed_tokens(x._replace(x=x.x[:, :2], scale=x.scale[:, 0])) is None
    assert ops.normed_tokens(fusion.NormedInput(x.x[0], "rms", 1e-6, scale=x.scale.expand(2, 7, 256)[0])) is None  # 2-D, per row
    w_int8 = torch.randint(-127, 128, (24, 256), dtype=torch.int8, device=device)
    w_scale = torch.full((24, 1), 1e-3, device=device)
    lora = ops.LoraFactors(*(torch.randn(s, device=device, dtype=torch.bfloat16) for s in ((4, 256), (24, 4))),
                           torch.rand(4, device=device))
    with ops.use_backend(backend):
        for given, kwargs in ((x, {"rotation": 16}), (per_token, {})):
            fused = ops.int8_linear(given, w_int8, w_scale, **kwargs)
            plain = ops.int8_linear(given.materialize(), w_int8, w_scale, **kwargs)
            torch.testing.assert_close(fused, plain, rtol=0, atol=0)
        fused = ops.int8_linear(x, w_int8, w_scale, lora=lora)
        tokens = ops.quantize_input(x)  # the fused path's
        torch.testing.assert_close(fused, ops.int8_linear(tokens, w_int8, w_scale, lora=lora), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_non_finite_tokens_poison_only_their_output_row(backend, device):
    x = make_input("layer", 1, 6, 128, torch.bfloat16, device, weight=False, shift=False)
    x.x[0, 1, 5] = float("nan")
    x.x[0, 2, 9] = float("inf")
    x.x[0, 4] = 0  # an all-zero input row
    w_int8 = torch.ones(8, 128, dtype=torch.int8, device=device)
    bias = torch.arange(8.0, device=device)
    with ops.use_backend(backend):
        out = ops.int8_linear(x, w_int8, torch.ones(8, 1, device=device), bias, out_dtype=torch.float32)[0]
    assert torch.isnan(out[1:3]).all() and torch.equal(out[4], bias) and torch.isfinite(out[[0, 3, 5]]).all()


def test_layers_share_a_normed_input_only_where_all_of_them_are_int8():
    """Int8 layers of one rotation quantize it once, for all of them, with the result each would get; a
    float layer among them takes the input computed once."""
    x = make_input("layer", 1, 3, 32, torch.float32, "cpu")
    int8, other = (Int8Linear.from_float(torch.nn.Linear(32, 8)) for _ in range(2))
    shared = fusion.shared_input(x, int8, other)
    assert isinstance(shared, ops.QuantizedInput) and torch.equal(other(shared), other(x))
    assert fusion.shared_input(x, int8) is x  # one layer quantizes it itself
    rotated = Int8Linear.from_float(torch.nn.Linear(32, 8), rotation=16)
    assert fusion.shared_input(x, int8, rotated) is x  # quantized two ways: each its own
    int8.use_float = True
    assert fusion.shared_input(x, int8, other) is x
    shared = fusion.shared_input(x, other, torch.nn.Linear(32, 8))
    assert torch.equal(shared, x.materialize())
    assert torch.equal(layers.modulate(x.x, x.shift, x.scale), layers.modulated(x.x, x.shift, x.scale).materialize())


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_compiled_layers_quantize_a_normed_input_as_eager_layers_do(backend, device):
    """Under torch.compile the Triton backend calls the fused kernel through its op
    (``int8_studio::quantize_normed_tokens``), other backends materialize the input: either way the output is
    the eager one exactly, with no graph break and no recompile for another token count."""
    torch._dynamo.reset()
    layer = Int8Linear.from_float(torch.nn.Linear(64, 16)).to(device, torch.bfloat16)
    x = make_input("rms", 2, 8, 64, torch.bfloat16, device)
    with ops.use_backend(backend):
        explanation = torch._dynamo.explain(lambda x: fusion.project(layer, x))(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        fused = "int8_studio.quantize_normed_tokens" in explanation.graphs[0].code
        assert fused == (backend == "triton") and fused != ("rms_norm" in explanation.graphs[0].code)
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(lambda x: fusion.project(layer, x), backend=counter, fullgraph=True)
        for tokens in (8, 13):
            x = make_input("rms", 2, tokens, 64, torch.bfloat16, device)
            torch._dynamo.mark_dynamic(x.x, 1)
            torch.testing.assert_close(compiled(x), fusion.project(layer, x), rtol=0, atol=0)
        assert counter.frame_count == 1


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("norm", ops.NORMS)
def test_the_normed_op_on_any_backend_is_the_kernel_within_one_rounding(backend, device, norm):
    """``int8_studio::quantize_normed_tokens`` off the Triton backend materializes the input, rounded to the
    input dtype after the norm and after the modulation where the kernel keeps float32: int8 values
    within two steps, scales within two roundings, each up to 1.5 ulps apart (the interpreter's casts
    truncate where PyTorch rounds to nearest). ``1 + scale`` is exact here, or its rounding would be a
    third such difference."""
    x = make_input(norm, 2, 9, 200, torch.bfloat16, device)
    x = x._replace(scale=(1 + x.scale).clamp(0.5, 2) - 1)  # exact in bfloat16 (Sterbenz)
    tokens, norm = ops.normed_tokens(x)
    want_q, want_scale = kernels.quantize_normed_tokens(tokens, norm)
    with ops.use_backend(backend):
        q, scale = ops.quantize_normed_tokens(tokens, *norm)
    assert q.dtype == torch.int8 and q.shape == tokens.shape and scale.shape == (tokens.shape[0],)
    assert (q.int() - want_q.int()).abs().max() <= 2
    torch.testing.assert_close(scale, want_scale, rtol=3 * ULP[torch.bfloat16], atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_opcheck_of_the_normed_quantization(backend):
    tokens, norm = ops.normed_tokens(make_input("layer", 2, 5, 48, torch.bfloat16, "cpu"))
    with ops.use_backend(backend):
        torch.library.opcheck(ops.quantize_normed_tokens, (tokens, *norm))
        torch.library.opcheck(ops.quantize_normed_tokens, (tokens, True, None, 1e-6, None, None, 5))
