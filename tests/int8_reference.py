"""References for the int8 kernels and ops tests: float64 ones, and :func:`attention_emulation`, the attention
kernel's own rounding in PyTorch (which ``benchmarks/attention_error.py`` runs in models on the CPU)."""

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


def attention_emulation(q, k, v, sm_scale: float, heads: int = 4, to_half=None, fp8_pv: bool = False) -> torch.Tensor:
    """``kernels.quantized_attention`` in PyTorch, rounding included, for float16 or bfloat16 q, k, v
    [batch, heads, tokens, head_dim] on the CPU: where the Triton interpreter is far too slow for the models'
    4–17k tokens. The kernel's steps in its float32 arithmetic: q and k quantized per block as it does
    (:func:`quantize_blocks_reference`; the int8 products are exact in float32), the scores in log2 units,
    the online softmax over the kernel's blocks of keys (each block's P rounded to half precision against
    the running maximum of that step, as the kernel's ``P V`` takes it), the output rounded to q's dtype.
    It departs from the GPU only in float32 summation order and ``exp2``'s last bits. ``heads`` heads at a
    time keep memory at a few hundred MB. ``to_half`` rounds float32 to q's dtype: by default to nearest, as
    the GPU does (:func:`interpreter_bfloat16` is the Triton interpreter's way). ``fp8_pv``: ``P V`` in
    float8 e4m3 as the kernel's option computes it (V quantized by ``quantize_values``, P · 448 rounded)."""
    from engine.int8.kernels.attention import FP8_MAX, KEY_BLOCK, LOG2E, QUERY_BLOCK, quantize_values  # needs Triton

    out = torch.empty_like(q)
    to_half = to_half or (lambda t: t.to(q.dtype))
    q_factor = torch.tensor(sm_scale * LOG2E, dtype=torch.float32)  # the kernel's float32 scalar argument
    v_factor = None
    if fp8_pv:
        v, v_factor = quantize_values(v)
        v = v.float()

    def p_round(p: torch.Tensor) -> torch.Tensor:
        return (p * FP8_MAX).to(torch.float8_e4m3fn).float() if fp8_pv else to_half(p).float()

    for b in range(q.shape[0]):
        for h in range(0, q.shape[1], heads):
            part = slice(h, h + heads)
            qkv = (q[b, part], k[b, part], v[b, part])
            acc = _emulated_heads(*qkv, q_factor, QUERY_BLOCK, KEY_BLOCK, p_round)
            out[b, part] = to_half(acc if v_factor is None else acc * v_factor[b, part, None, :])
    return out


def _emulated_heads(q, k, v, q_factor, query_block: int, key_block: int, p_round) -> torch.Tensor:
    """:func:`attention_emulation` of q, k, v [heads, tokens, head_dim], before V's factors and the
    output's rounding; ``p_round`` rounds P as ``P V`` takes it."""
    q8, q_scale = (t[0].float() for t in quantize_blocks_reference(q[None], query_block))
    k8, k_scale = (t[0].float() for t in quantize_blocks_reference(k[None], key_block, smooth=True))
    q_scale = q_scale * q_factor
    heads, tokens, dim = q.shape
    m = torch.full((heads, tokens), float("-inf"))  # running maximum of each query's scores
    l = torch.zeros(heads, tokens)  # running sum of exp2(score - m)
    acc = torch.zeros(heads, tokens, dim)
    for start in range(0, tokens, key_block):
        keys = slice(start, start + key_block)
        scale = q_scale * k_scale[:, start, None]  # one value per pair of blocks, as in the kernel
        s = torch.bmm(q8, k8[:, keys].transpose(1, 2)).mul_(scale[:, :, None])
        m_new = torch.maximum(m, s.amax(dim=2))
        alpha = torch.exp2(m - m_new)
        p = s.sub_(m_new[:, :, None]).exp2_()
        l.mul_(alpha).add_(p.sum(dim=2))
        acc.mul_(alpha[:, :, None]).baddbmm_(p_round(p), v[:, keys].float())
        m = m_new
    return acc.div_(l[:, :, None])


def interpreter_bfloat16(t: torch.Tensor) -> torch.Tensor:
    """float32 ``t`` to bfloat16 as Triton's interpreter casts it: truncated, not rounded (see :data:`ULP`)."""
    return (t.view(torch.int32) & -(2**16)).view(torch.float32).to(torch.bfloat16)
