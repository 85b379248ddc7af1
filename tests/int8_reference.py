"""float64 references for the int8 kernels and ops tests."""

from __future__ import annotations

import os

import pytest
import torch

from engine.int8.quantize import dequantize_weight

NEEDS_INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"
)
"""For Triton kernels run on CPU tensors (conftest sets the variable before Triton is imported)."""
DEVICES = [pytest.param("cpu", marks=NEEDS_INTERPRETER), pytest.param("cuda", marks=pytest.mark.gpu)]
"""Where kernel tests run: the interpreter on the CPU, and the GPU (marker ``gpu``)."""
BACKENDS = [
    pytest.param("torch", "cpu"),
    pytest.param("int_mm", "cpu"),
    pytest.param("triton", "cpu", marks=NEEDS_INTERPRETER),
    pytest.param("triton", "cuda", marks=pytest.mark.gpu),
]
"""``(backend, device)`` pairs for ``int8_linear`` tests: every backend on the CPU, Triton on the GPU."""

# One unit in the last place, relative: rounding to nearest needs half of it, but Triton's interpreter
# truncates its float32 -> bfloat16 casts.
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}


def float_reference(x, w_int8, w_scale, bias=None) -> torch.Tensor:
    """x · (w_int8 · w_scale)ᵀ + bias in float64: what the layer would give without quantizing x."""
    y = x.double() @ dequantize_weight(w_int8, w_scale, torch.float64).t()
    return y + bias.double() if bias is not None else y


def activation_rounding_bound(x, w_int8, w_scale) -> torch.Tensor:
    """Largest error that rounding each token of x to its int8 grid can cause: (s_x / 2) · Σ_k |w[n, k]|."""
    x_scale = x.double().abs().amax(dim=-1, keepdim=True) / 127
    return x_scale / 2 * dequantize_weight(w_int8, w_scale, torch.float64).abs().sum(dim=1)


def assert_within_int8_rounding(out, x, w_int8, w_scale, bias=None) -> None:
    """``out`` is the W8A8 product of x: off the float product only by activation rounding and out's dtype."""
    ref = float_reference(x, w_int8, w_scale, bias)
    bound = activation_rounding_bound(x, w_int8, w_scale) * (1 + 1e-5) + ref.abs() * ULP[out.dtype] + 1e-30
    err = (out.double() - ref).abs()
    assert out.dtype in ULP and torch.isfinite(out).all()
    assert (err <= bound).all(), f"error {(err / bound).max():.3f}× the int8 rounding bound"


def exact_scaled_mm(q, x_scale, w_int8, w_scale, bias=None) -> torch.Tensor:
    """(q @ w_int8ᵀ) · x_scale · w_scale + bias in float64, q being already-quantized activations."""
    acc = q.double() @ w_int8.double().t()
    y = acc * x_scale.double()[:, None] * w_scale.double().reshape(-1)
    return y + bias.double() if bias is not None else y
