"""Per-token int8 quantization kernels: plain, activated, rotated and normed tokens.

Each kernel quantizes tokens (rows of a 2-D [tokens, K] input) symmetrically to int8 with their own
float32 scale, ``absmax / 127``. Each program owns a few tokens; where a token does not fit in
registers it loops over K twice (absmax, then quantize) and the second read hits L2, so DRAM sees one
read of the input and one write of ``q``. Any K works.

The input may be given before its activation (an :class:`~engine.fusion.ActivatedInput`: SwiGLU,
GELU, optionally after a concatenated prefix), which the kernel applies on the way in, so the
activation's output is never written and read back; :func:`quantize_rotated_tokens` does the same
with a Hadamard rotation, and :func:`quantize_normed_tokens` with a norm and modulation.

Rounding is to nearest, ties to even (``torch.round``), done with the 1.5·2²³ trick rather than a
``libdevice`` call so that the kernels compile on every backend and run in the interpreter. They are
compiled without FMA contraction, so they compute exactly what
:func:`engine.int8.backends.quantize_tokens_torch` computes in PyTorch: the Triton and PyTorch paths
give the same int8 values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.fusion import ActivatedInput
from engine.int8.kernels.runtime import cdiv, launch, next_power_of_2
from engine.int8.operands import SampleNorm
from engine.int8.quantize import MIN_ABSMAX

_MIN_ABSMAX = tl.constexpr(MIN_ABSMAX)


@triton.jit
def _round_half_even(v):
    # Adding 1.5·2²³ pushes the fraction bits out of an fp32 mantissa with the hardware's
    # round-to-nearest-even; subtracting it back gives rint(v) for |v| < 2²². Needs no FMA contraction.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _token_scales(absmax, poison):
    """(scale, 1 / scale) per token from its |x| maxima; tokens with NaN/Inf get (NaN, 0)."""
    finite = tl.sum(poison, axis=1) == 0.0
    row_max = tl.maximum(tl.max(absmax, axis=1), _MIN_ABSMAX)
    scale = tl.where(finite, tl.math.div_rn(row_max, 127.0), float("nan"))
    inv_scale = tl.where(finite, tl.math.div_rn(127.0, row_max), 0.0)
    return scale, inv_scale


@triton.jit
def _to_int8(x, inv_scale):
    q = _round_half_even(x * inv_scale[:, None])
    q = tl.where(inv_scale[:, None] == 0.0, 0.0, q)  # tokens with NaN/Inf are all zeros
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


ACTIVATION_CODES = {"swiglu": 1, "gelu_tanh": 2, "identity": 3}
"""The ``ACT`` code of each activation a quantization kernel applies on the way in
(:data:`engine.fusion.ACTIVATIONS`); 0 is none."""


@triton.jit
def swiglu(a, b):
    """``silu(a) · b`` in float32 (also the gated GEMM's epilogue)."""
    return a / (1.0 + tl.exp(-a)) * b


@triton.jit
def _load_tokens(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, EVEN_K: tl.constexpr, ACT: tl.constexpr):
    """Columns ``k + cols`` of the tokens to quantize, in the input dtype: ``x`` itself, or with ``ACT``
    ``[x[:, :P], act(a, b)]``. The activation is computed in float32 and rounded once to the input dtype,
    as the unfused layer would round its output."""
    if ACT == 0:  # no activation
        mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (cols[None, :] < K - k)
        return tl.load(x_rows + k, mask=mask, other=0.0)
    c = (k + cols)[None, :]
    in_x = row_ok[:, None] & (c < P)
    in_act = row_ok[:, None] & (c >= P) & (c < K)
    x = tl.load(x_rows + k, mask=in_x, other=0.0)  # no prefix (P = 0): nothing is read
    a = tl.load(a_rows + (k - P), mask=in_act, other=0.0).to(tl.float32)
    if ACT == 1:  # silu(a) · b
        y = swiglu(a, tl.load(b_rows + (k - P), mask=in_act, other=0.0).to(tl.float32))
    elif ACT == 2:  # gelu_tanh(a) = a · sigmoid(2·√(2/π)·(a + 0.044715·a³))
        y = a / (1.0 + tl.exp(-1.5957691216057308 * (a + 0.044715 * a * a * a)))
    else:  # identity: a as it is (a prefix and tokens that need no activation)
        y = a
    return tl.where(in_x, x, y.to(x.dtype))


@triton.jit(do_not_specialize=["M"])  # M = 1 must not get its own (slower) compilation
def _quantize_tokens_kernel(
    x_ptr, a_ptr, b_ptr, q_ptr, scale_ptr, M, K, P, stride_xm, stride_am, stride_bm, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ACT: tl.constexpr,
):
    """One program per BLOCK_M tokens. SINGLE_PASS (BLOCK_K ≥ K): the tokens stay in registers between
    the absmax and the rounding; otherwise two loops over K, the second reading the tokens from L2."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :]
    b_rows = b_ptr + rows.to(tl.int64)[:, None] * stride_bm + cols[None, :]
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :]

    if SINGLE_PASS:
        x = _load_tokens(x_rows, a_rows, b_rows, row_ok, 0, cols, K, P, EVEN_K, ACT).to(tl.float32)
        scale, inv_scale = _token_scales(tl.abs(x), x * 0.0)  # x·0 is NaN exactly where x is NaN or ±Inf
        mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (cols[None, :] < K)
        tl.store(q_rows, _to_int8(x, inv_scale), mask=mask)
    else:
        absmax = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        poison = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for k in range(0, K, BLOCK_K):
            x = _load_tokens(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, EVEN_K, ACT).to(tl.float32)
            absmax = tl.maximum(absmax, tl.abs(x))
            poison += x * 0.0
        scale, inv_scale = _token_scales(absmax, poison)
        for k in range(0, K, BLOCK_K):
            x = _load_tokens(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, EVEN_K, ACT).to(tl.float32)
            mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (cols[None, :] < K - k)
            tl.store(q_rows + k, _to_int8(x, inv_scale), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


SINGLE_PASS_MAX_K = 16384
"""Tokens up to this long may be quantized from registers (one read of x); longer ones loop over K."""
SINGLE_PASS_MIN_FILL = 0.8
"""A token filling less of its power-of-two register block than this loops over K in short blocks
instead: the masked lanes cost more than the second read, which comes from L2 (docs/PERFORMANCE.md)."""


def _whole_tokens(K: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_K)`` holding whole tokens of K elements in registers, several short ones per program."""
    block_k = max(16, next_power_of_2(K))
    return max(1, 2048 // block_k), block_k


def quantize_launch(K: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_K, num_warps)`` of ``_quantize_tokens_kernel`` for tokens of K elements. Four
    warps throughout: more were never faster (docs/PERFORMANCE.md)."""
    block_m, whole = _whole_tokens(K)
    if whole <= SINGLE_PASS_MAX_K and (whole <= 2048 or K >= SINGLE_PASS_MIN_FILL * whole):
        return block_m, whole, 4
    block_m, block_k = (4, 512) if K <= 4096 else (2, 2048)
    return block_m, min(block_k, SINGLE_PASS_MAX_K), 4


def _quantized_empty(M: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a quantization kernel: q int8 [M, K] and scale float32 [M]."""
    return torch.empty(M, K, dtype=torch.int8, device=device), torch.empty(M, dtype=torch.float32, device=device)


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(1) == 1 else t.contiguous()


def _sources(x: torch.Tensor | ActivatedInput):
    """Kernel arguments for the tokens to quantize: (M, K, P, x, a, b, their row strides, ACT). Unused
    pointers are any of the others; every source has unit column stride."""
    if isinstance(x, torch.Tensor):
        x = _unit_stride(x)
        return x.shape[0], x.shape[1], x.shape[1], x, x, x, x.stride(0), 0, 0, 0
    prefix, a, b = (_unit_stride(t) for t in (x.prefix, x.a, x.b))
    code = ACTIVATION_CODES[x.activation]
    width = 0 if prefix is None else prefix.shape[1]
    prefix, b = (a if t is None else t for t in (prefix, b))
    return a.shape[0], width + a.shape[1], width, prefix, a, b, prefix.stride(0), a.stride(0), b.stride(0), code


def quantize_tokens(x: torch.Tensor | ActivatedInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of 2-D float tokens ``x`` [M, K], or of a 2-D
    :class:`~engine.fusion.ActivatedInput` (its activation applied on the way in):
    ``(q int8 [M, K], scale float32 [M])``."""
    M, K, P, x, a, b, stride_x, stride_a, stride_b, act = _sources(x)
    q, scale = _quantized_empty(M, K, x.device)
    block_m, block_k, num_warps = quantize_launch(K)
    launch(
        _quantize_tokens_kernel, (cdiv(M, block_m),),
        x, a, b, q, scale, M, K, P, stride_x, stride_a, stride_b, q.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, EVEN_K=K % block_k == 0, SINGLE_PASS=K <= block_k, ACT=act,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return q, scale


@triton.jit(do_not_specialize=["M"])
def _quantize_normed_tokens_kernel(
    x_ptr, w_ptr, mod_ptr, shift_ptr, q_ptr, scale_ptr, M, K, tokens, stride_xm, stride_mod, stride_shift,
    stride_qm, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """One program per BLOCK_M whole tokens (BLOCK_K ≥ K): norm, modulation and quantization from
    registers. The norm's output, ``1 + scale`` (``mod_ptr``) and the modulated tokens are rounded as the
    unfused ops round them: to x's dtype, to the scale's."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    raw = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = raw.to(tl.float32)
    if RMS:
        y = x * tl.math.rsqrt(tl.sum(x * x, axis=1) / K + eps)[:, None]
    else:
        centred = tl.where(mask, x - (tl.sum(x, axis=1) / K)[:, None], 0.0)
        y = centred * tl.math.rsqrt(tl.sum(centred * centred, axis=1) / K + eps)[:, None]
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = y.to(raw.dtype).to(tl.float32)
    batch = (rows // tokens).to(tl.int64)[:, None]
    if HAS_SCALE:
        mod = tl.load(mod_ptr + batch * stride_mod + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y *= (1.0 + mod).to(mod_ptr.dtype.element_ty).to(tl.float32)
    if HAS_SHIFT:
        y += tl.load(shift_ptr + batch * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.where(mask, y.to(raw.dtype).to(tl.float32), 0.0)
    scale, inv_scale = _token_scales(tl.abs(y), y * 0.0)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], _to_int8(y, inv_scale), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def quantize_normed_tokens(x: torch.Tensor, norm: SampleNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_tokens` of ``x`` [M, K] after its norm and modulation (``norm``), in one read of x.
    Tokens of up to ``SINGLE_PASS_MAX_K`` elements."""
    M, K = x.shape
    if K > SINGLE_PASS_MAX_K:
        raise ValueError(f"tokens of {K} elements are longer than the fused norm handles ({SINGLE_PASS_MAX_K})")
    x, mod, shift = (_unit_stride(t) for t in (x, norm.scale, norm.shift))
    weight = None if norm.weight is None else norm.weight.contiguous()
    q, scale = _quantized_empty(M, K, x.device)
    block_m, block_k = _whole_tokens(K)
    launch(
        _quantize_normed_tokens_kernel, (cdiv(M, block_m),),
        x, x if weight is None else weight, x if mod is None else mod, x if shift is None else shift, q, scale,
        M, K, norm.tokens, x.stride(0), 0 if mod is None else mod.stride(0),
        0 if shift is None else shift.stride(0), q.stride(0), norm.eps,
        BLOCK_M=block_m, BLOCK_K=block_k, RMS=norm.rms, HAS_WEIGHT=weight is not None, HAS_SCALE=mod is not None,
        HAS_SHIFT=shift is not None,
        num_warps=4, enable_fp_fusion=False,
    )
    return q, scale


ROTATION_GROUP = 256
"""The Hadamard group size the fused kernel handles (ComfyUI's): H₂₅₆ = H₁₆ ⊗ H₁₆."""


@triton.jit
def _rotate_group(x, h, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """``x`` [BLOCK_M, 256] times H₂₅₆ = H₁₆ ⊗ H₁₆ (``h``, H₁₆ [16, 16]) as two small matmuls: with a
    group seen as a 16×16 matrix X, the product is H₁₆ᵀ·X·H₁₆. Float32 result."""
    z = tl.dot(tl.reshape(x, (BLOCK_M * 16, 16)).to(h.dtype), h, input_precision=PRECISION)  # X·H
    z = tl.reshape(tl.permute(tl.reshape(z, (BLOCK_M, 16, 16)), (0, 2, 1)), (BLOCK_M * 16, 16))
    y = tl.dot(z, h.to(tl.float32), input_precision="tf32x3")  # (X·H)ᵀ·H = (Hᵀ·X·H)ᵀ, near float32
    return tl.reshape(tl.permute(tl.reshape(y, (BLOCK_M, 16, 16)), (0, 2, 1)), (BLOCK_M, 256))


@triton.jit(do_not_specialize=["M"])
def _quantize_rotated_tokens_kernel(
    x_ptr, a_ptr, b_ptr, h_ptr, q_ptr, scale_ptr, M, K, P, stride_xm, stride_am, stride_bm, stride_qm,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, ACT: tl.constexpr,
):
    """Per-token int8 quantization of the tokens (as :func:`_load_tokens` reads them) rotated group by
    group (K a multiple of 256): one loop over the groups for the absmax, a second that rotates again and
    rounds (its reads hit L2)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, 256)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :]
    b_rows = b_ptr + rows.to(tl.int64)[:, None] * stride_bm + cols[None, :]
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :]
    h = tl.load(h_ptr + tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :])
    absmax = tl.zeros([BLOCK_M, 256], tl.float32)
    poison = tl.zeros([BLOCK_M, 256], tl.float32)
    for k in range(0, K, 256):
        x = _load_tokens(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, True, ACT)
        y = _rotate_group(x, h, BLOCK_M, PRECISION)
        absmax = tl.maximum(absmax, tl.abs(y))
        poison += y * 0.0
    scale, inv_scale = _token_scales(absmax, poison)
    for k in range(0, K, 256):
        x = _load_tokens(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, True, ACT)
        y = _rotate_group(x, h, BLOCK_M, PRECISION)
        tl.store(q_rows + k, _to_int8(y, inv_scale), mask=row_ok[:, None])
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def quantize_rotated_tokens(x: torch.Tensor | ActivatedInput, h16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_tokens` of the tokens rotated by H₂₅₆ per group of 256 channels, in one kernel:
    the input is read (twice, the second time from L2) but the rotated copy never reaches memory.
    ``h16`` is the normalized H₁₆ in the tokens' dtype for half-precision tokens (its entries ±1/4 are
    exact there, so the first product is exact), float32 otherwise."""
    M, K, P, x, a, b, stride_x, stride_a, stride_b, act = _sources(x)
    q, scale = _quantized_empty(M, K, x.device)
    if not x.is_cuda:  # the interpreter multiplies bfloat16 tiles as if they were int16
        h16 = h16.float()
    block_m = 8
    launch(
        _quantize_rotated_tokens_kernel, (cdiv(M, block_m),),
        x, a, b, h16, q, scale, M, K, P, stride_x, stride_a, stride_b, q.stride(0),
        BLOCK_M=block_m, PRECISION="tf32x3" if x.dtype == torch.float32 else "ieee", ACT=act,
        num_warps=4, enable_fp_fusion=False,
    )
    return q, scale
