"""float64 references for the int8 kernels and ops tests."""

from __future__ import annotations

import os

import pytest
import torch

from engine.int8.quantize import MIN_ABSMAX, QMAX, dequantize_weight

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


def quantize_blocks_reference(x: torch.Tensor, block: int, smooth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``kernels.quantize_blocks`` computes, in PyTorch: queries or keys [batch, heads, tokens, head_dim]
    (smoothed: less their float32 mean over tokens) rounded to int8 per ``block`` tokens of a head, in the
    kernel's float32 steps so the int8 values are the same. Returns ``(q, scale)`` in float64, the scale
    repeated for each token [batch, heads, tokens]."""
    B, H, N, D = x.shape
    x32 = x.float() - x.mean(dim=2, dtype=torch.float32, keepdim=True) if smooth else x.float()
    blocks = -(-N // block)
    padded = torch.zeros(B, H, blocks * block, D).index_copy_(2, torch.arange(N), x32.cpu())
    absmax = padded.unflatten(2, (blocks, block)).abs().amax(dim=(3, 4)).clamp(min=MIN_ABSMAX)
    qmax = torch.full_like(absmax, QMAX)
    q = torch.round(x32.cpu() * (qmax / absmax).repeat_interleave(block, 2)[:, :, :N, None]).clamp(-QMAX, QMAX)
    return q.double(), (absmax / qmax).double().repeat_interleave(block, 2)[:, :, :N]


def attention_reference(q, k, v, sm_scale: float, query_block: int, key_block: int, smooth_k: bool = True):
    """8-bit attention as the kernel computes it, rounding aside: q and k quantized per block
    (:func:`quantize_blocks_reference`), the scores dequantized, softmax and ``P V`` in float64."""
    q8, q_scale = quantize_blocks_reference(q, query_block)
    k8, k_scale = quantize_blocks_reference(k, key_block, smooth_k)
    scores = (q8 @ k8.transpose(-1, -2)) * q_scale[..., :, None] * k_scale[..., None, :] * sm_scale
    return torch.softmax(scores, dim=-1) @ v.double().cpu()
