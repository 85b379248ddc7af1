"""Triton kernels for W8A8 linear layers.

Two kernels:

* ``quantize_rows``: per-token (per-row) symmetric int8 quantization of the activations. Each program
  owns a few rows and loops over K twice (absmax, then quantize); the second read of a row hits L2, so
  DRAM sees one read of ``x`` and one write of ``q``. Any K works: no row has to fit in registers.
  It can also take a down-projection's input before its activation (SwiGLU, GELU, optionally after a
  concatenated prefix) and apply the activation on the way in, so the activation's bf16 output is
  never written and read back; ``quantize_rotated_rows`` does the same with a Hadamard rotation.
* ``scaled_mm``: ``out = (q @ w_int8ᵀ) · x_scale[row] · w_scale[col] + bias``, int32 accumulation, the
  dequantization fused into the epilogue so the int32 product never reaches memory. The epilogue can
  also add a low-rank term ``(xa · scale) @ upᵀ`` (dynamic LoRA): a bf16 MMA of depth r per tile,
  instead of a second [M, N] product written, read back and added. Gated (:class:`Gate`), each tile
  multiplies its rows of ``q`` with two weights and stores ``silu(first) · second``: a SwiGLU
  in-projection whose two halves never reach memory.

Rounding is to nearest, ties to even (``torch.round``), done with the 1.5·2²³ trick rather than a
``libdevice`` call so that the kernels compile on every backend and run in the interpreter. The
quantization kernel is compiled without FMA contraction so it computes exactly what
``ops.quantize_rows_torch`` computes in PyTorch: the Triton and PyTorch paths give the same int8 values.

Tile configurations are chosen per GPU architecture and tuned per (power-of-two bucket of M, N, K) on
first use; the winners are kept in a JSON file in the user's cache directory, so a second run starts
without tuning (see :class:`GemmTuner`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.heads import QKNormRope, attention_inputs, rope_of
from engine.int8.quantize import MIN_ABSMAX
from engine.paths import cache_dir

MIN_TRITON = (3, 4)
"""``tl.range(warp_specialize=...)`` and descriptors made inside a kernel arrived in Triton 3.4."""


def triton_release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a Triton version string such as ``"3.6.0"`` or ``"3.4.0+git1a2b"``."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


if triton_release(triton.__version__) < MIN_TRITON:  # ops.py then falls back to torch._int_mm
    raise ImportError(f"the int8 kernels need Triton 3.4 or newer, found {triton.__version__}")

# imported after the check, whose error says why an old Triton is refused
from triton.compiler import CompiledKernel
from triton.tools.tensor_descriptor import TensorDescriptor

try:  # Triton's compile queue (a private module): where it is missing, kernels compile one by one
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:
    AsyncCompileMode = None

_MIN_ABSMAX = tl.constexpr(MIN_ABSMAX)

_COMPILED: dict[tuple, tuple[CompiledKernel, list[str]]] = {}


def launch(kernel: triton.JITFunction, grid: tuple[int, ...], *args, compile_only: bool = False, **named) -> None:
    """``kernel[grid](*args, **named)``: runtime arguments by position, constexprs and launch options
    (``num_warps``, …) by name; through the binary Triton compiled for an earlier call alike in
    everything Triton specializes on (:func:`_arg_key`) and in every named value.

    Triton's own launch binds and specializes each argument again at every call: 30–46 µs of host
    time per GEMM launch on an H200 machine, against 11–17 µs for the compiled kernel's launcher, and
    a per-layer cost that left small images host-bound (PERFORMANCE.md). A first call, and every call
    in the interpreter, goes through Triton. The current GPU is part of the key: a compiled kernel is
    loaded into one GPU's context. ``compile_only`` compiles without launching (under
    ``AsyncCompileMode``: queues the compilation)."""
    if compile_only:
        kernel.warmup(*args, grid=grid, **named)
        return
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None  # binaries load per GPU
    key = (kernel, device, *map(_arg_key, args), *named.items())
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **named)
        constexprs = kernel.arg_names[len(args) :]
        if isinstance(compiled, CompiledKernel) and all(name in named for name in constexprs):
            _COMPILED[key] = compiled, constexprs
        return
    compiled, constexprs = hit
    compiled[(*grid, 1, 1)[:3]](*args, *[named[name] for name in constexprs])


# triton.cdiv and triton.next_power_of_2 are JIT functions in newer Triton releases: ~13 µs a host call
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _arg_key(arg) -> tuple | type:
    """What Triton (3.4–3.6) compiles a runtime argument into its kernel: a tensor's dtype and whether
    its address is a multiple of 16; an integer's width (i32, i64, u64), whether it is 1 (then a
    constant) and whether it is a multiple of 16; a descriptor's dtype and block shape. Other values
    (floats, booleans, None) only by their type. ``tests/test_kernels.py`` checks this against Triton's
    own specialization."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15 == 0
    if type(arg) is int:
        return arg == 1, arg & 15 == 0, -(2**31) <= arg < 2**31, arg < 2**63
    if isinstance(arg, TensorDescriptor):
        return arg.base.dtype, tuple(arg.block_shape)
    return type(arg)


@triton.jit
def _round_half_even(v):
    # Adding 1.5·2²³ pushes the fraction bits out of an fp32 mantissa with the hardware's
    # round-to-nearest-even; subtracting it back gives rint(v) for |v| < 2²². Needs no FMA contraction.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_scales(absmax, poison):
    """(scale, 1 / scale) per row from its |x| maxima; rows with NaN/Inf get (NaN, 0)."""
    finite = tl.sum(poison, axis=1) == 0.0
    row_max = tl.maximum(tl.max(absmax, axis=1), _MIN_ABSMAX)
    scale = tl.where(finite, tl.math.div_rn(row_max, 127.0), float("nan"))
    inv_scale = tl.where(finite, tl.math.div_rn(127.0, row_max), 0.0)
    return scale, inv_scale


@triton.jit
def _to_int8(x, inv_scale):
    q = _round_half_even(x * inv_scale[:, None])
    q = tl.where(inv_scale[:, None] == 0.0, 0.0, q)  # rows with NaN/Inf are all zeros
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


ACTIVATIONS = {"swiglu": 1, "gelu_tanh": 2, "identity": 3}
"""What a quantization kernel can apply on the way in (:class:`Activated`), by name: its ``ACT`` code."""


class Activated(NamedTuple):
    """Rows given before their activation, which the kernel applies on the way in: ``"swiglu"``
    (``silu(a) · b``), ``"gelu_tanh"`` (``gelu_tanh(a)``) or ``"identity"`` (``a``; with a prefix, a
    concatenation), ``b`` None but for SwiGLU; a, b [M, m]."""

    name: str
    a: torch.Tensor
    b: torch.Tensor | None = None


@triton.jit
def _swiglu(a, b):
    """``silu(a) · b`` in float32."""
    return a / (1.0 + tl.exp(-a)) * b


@triton.jit
def _load_rows(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, EVEN_K: tl.constexpr, ACT: tl.constexpr):
    """Columns ``k + cols`` of the rows to quantize, in the input dtype: ``x`` itself, or with ``ACT``
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
        y = _swiglu(a, tl.load(b_rows + (k - P), mask=in_act, other=0.0).to(tl.float32))
    elif ACT == 2:  # gelu_tanh(a) = a · sigmoid(2·√(2/π)·(a + 0.044715·a³))
        y = a / (1.0 + tl.exp(-1.5957691216057308 * (a + 0.044715 * a * a * a)))
    else:  # identity: a as it is (a prefix and rows that need no activation)
        y = a
    return tl.where(in_x, x, y.to(x.dtype))


@triton.jit(do_not_specialize=["M"])  # M = 1 must not get its own (slower) compilation
def _quantize_rows_kernel(
    x_ptr, a_ptr, b_ptr, q_ptr, scale_ptr, M, K, P, stride_xm, stride_am, stride_bm, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ACT: tl.constexpr,
):
    """One program per BLOCK_M rows. SINGLE_PASS (BLOCK_K ≥ K): the rows stay in registers between
    the absmax and the rounding; otherwise two loops over K, the second reading the rows from L2."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :]
    b_rows = b_ptr + rows.to(tl.int64)[:, None] * stride_bm + cols[None, :]
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :]

    if SINGLE_PASS:
        x = _load_rows(x_rows, a_rows, b_rows, row_ok, 0, cols, K, P, EVEN_K, ACT).to(tl.float32)
        scale, inv_scale = _row_scales(tl.abs(x), x * 0.0)  # x·0 is NaN exactly where x is NaN or ±Inf
        mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (cols[None, :] < K)
        tl.store(q_rows, _to_int8(x, inv_scale), mask=mask)
    else:
        absmax = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        poison = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for k in range(0, K, BLOCK_K):
            x = _load_rows(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, EVEN_K, ACT).to(tl.float32)
            absmax = tl.maximum(absmax, tl.abs(x))
            poison += x * 0.0
        scale, inv_scale = _row_scales(absmax, poison)
        for k in range(0, K, BLOCK_K):
            x = _load_rows(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, EVEN_K, ACT).to(tl.float32)
            mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (cols[None, :] < K - k)
            tl.store(q_rows + k, _to_int8(x, inv_scale), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


SINGLE_PASS_MAX_K = 16384
"""Rows up to this long may be quantized from registers (one read of x); longer ones loop over K."""
SINGLE_PASS_MIN_FILL = 0.8
"""A row filling less of its power-of-two register block than this loops over K in short blocks instead:
the masked lanes cost more than the second read, which comes from L2 (H200: 10240-wide rows 58 → 46 µs,
3072-wide 16 → 12.5 µs at M = 4608; PERFORMANCE.md)."""


def _whole_rows(K: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_K)`` holding whole rows of K elements in registers, several short rows per program."""
    block_k = max(16, _next_power_of_2(K))
    return max(1, 2048 // block_k), block_k


def quantize_launch(K: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_K, num_warps)`` of ``_quantize_rows_kernel`` for rows of K elements. Four warps
    throughout: on an H200 eight or sixteen were never faster, and up to 10% slower at K = 4096."""
    block_m, whole = _whole_rows(K)
    if whole <= SINGLE_PASS_MAX_K and (whole <= 2048 or K >= SINGLE_PASS_MIN_FILL * whole):
        return block_m, whole, 4
    block_m, block_k = (4, 512) if K <= 4096 else (2, 2048)
    return block_m, min(block_k, SINGLE_PASS_MAX_K), 4


def _quantized_empty(M: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a quantization kernel: q int8 [M, K] and scale float32 [M]."""
    return torch.empty(M, K, dtype=torch.int8, device=device), torch.empty(M, dtype=torch.float32, device=device)


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(1) == 1 else t.contiguous()


def _row_sources(x: torch.Tensor | None, act: Activated | None):
    """Kernel arguments for the rows to quantize: (M, K, P, x, a, b, their row strides, ACT). Unused
    pointers are any of the others; every source has unit column stride."""
    if act is None:
        x = _unit_stride(x)
        return x.shape[0], x.shape[1], x.shape[1], x, x, x, x.stride(0), 0, 0, 0
    x, a, b = (_unit_stride(t) for t in (x, act.a, act.b))
    prefix = 0 if x is None else x.shape[1]
    x, b = (a if t is None else t for t in (x, b))
    return a.shape[0], prefix + a.shape[1], prefix, x, a, b, x.stride(0), a.stride(0), b.stride(0), ACTIVATIONS[act.name]


def quantize_rows(x: torch.Tensor | None, act: Activated | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization of a 2-D float tensor: ``(q int8 [M, K], scale float32 [M])``. With
    ``act``, of ``[x, act(a, b)]`` (``x`` None: of ``act(a, b)`` alone)."""
    M, K, P, x, a, b, stride_x, stride_a, stride_b, kind = _row_sources(x, act)
    q, scale = _quantized_empty(M, K, x.device)
    block_m, block_k, num_warps = quantize_launch(K)
    launch(
        _quantize_rows_kernel, (_cdiv(M, block_m),),
        x, a, b, q, scale, M, K, P, stride_x, stride_a, stride_b, q.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, EVEN_K=K % block_k == 0, SINGLE_PASS=K <= block_k, ACT=kind,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return q, scale


class Normed(NamedTuple):
    """How rows are normalized and modulated before they are quantized (:func:`quantize_normed_rows`):
    LayerNorm or RMSNorm (``rms``), times ``weight`` [K] if given, then ``· (1 + scale) + shift``: each
    [batch, K] or None, row r taking batch row ``r // tokens``."""

    rms: bool
    weight: torch.Tensor | None
    eps: float
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    tokens: int


@triton.jit(do_not_specialize=["M"])
def _quantize_normed_rows_kernel(
    x_ptr, w_ptr, mod_ptr, shift_ptr, q_ptr, scale_ptr, M, K, tokens, stride_xm, stride_mod, stride_shift,
    stride_qm, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """One program per BLOCK_M whole rows (BLOCK_K ≥ K): norm, modulation and quantization from registers.
    The norm's output, ``1 + scale`` (``mod_ptr``) and the modulated rows are rounded as the unfused ops
    round them: to x's dtype, to the scale's."""
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
    scale, inv_scale = _row_scales(tl.abs(y), y * 0.0)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], _to_int8(y, inv_scale), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def quantize_normed_rows(x: torch.Tensor, normed: Normed) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``x`` [M, K] after its norm and modulation (``normed``), in one read of x.
    Rows of up to ``SINGLE_PASS_MAX_K`` elements."""
    M, K = x.shape
    if K > SINGLE_PASS_MAX_K:
        raise ValueError(f"rows of {K} elements are longer than the fused norm handles ({SINGLE_PASS_MAX_K})")
    x, mod, shift = (_unit_stride(t) for t in (x, normed.scale, normed.shift))
    weight = None if normed.weight is None else normed.weight.contiguous()
    q, scale = _quantized_empty(M, K, x.device)
    block_m, block_k = _whole_rows(K)
    launch(
        _quantize_normed_rows_kernel, (_cdiv(M, block_m),),
        x, x if weight is None else weight, x if mod is None else mod, x if shift is None else shift, q, scale,
        M, K, normed.tokens, x.stride(0), 0 if mod is None else mod.stride(0),
        0 if shift is None else shift.stride(0), q.stride(0), normed.eps,
        BLOCK_M=block_m, BLOCK_K=block_k, RMS=normed.rms, HAS_WEIGHT=weight is not None, HAS_SCALE=mod is not None,
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
def _quantize_rotated_rows_kernel(
    x_ptr, a_ptr, b_ptr, h_ptr, q_ptr, scale_ptr, M, K, P, stride_xm, stride_am, stride_bm, stride_qm,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, ACT: tl.constexpr,
):
    """Per-row int8 quantization of the rows (as :func:`_load_rows` reads them) rotated group by group
    (K a multiple of 256): one loop over the groups for the absmax, a second that rotates again and
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
        x = _load_rows(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, True, ACT)
        y = _rotate_group(x, h, BLOCK_M, PRECISION)
        absmax = tl.maximum(absmax, tl.abs(y))
        poison += y * 0.0
    scale, inv_scale = _row_scales(absmax, poison)
    for k in range(0, K, 256):
        x = _load_rows(x_rows, a_rows, b_rows, row_ok, k, cols, K, P, True, ACT)
        y = _rotate_group(x, h, BLOCK_M, PRECISION)
        tl.store(q_rows + k, _to_int8(y, inv_scale), mask=row_ok[:, None])
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def quantize_rotated_rows(
    x: torch.Tensor | None, h16: torch.Tensor, act: Activated | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of the rows rotated by H₂₅₆ per group of 256 channels, in one kernel: the
    input is read (twice, the second time from L2) but the rotated copy never reaches memory. ``h16``
    is the normalized H₁₆ in the rows' dtype for half-precision rows (its entries ±1/4 are exact
    there, so the first product is exact), float32 otherwise."""
    M, K, P, x, a, b, stride_x, stride_a, stride_b, kind = _row_sources(x, act)
    q, scale = _quantized_empty(M, K, x.device)
    if not x.is_cuda:  # the interpreter multiplies bfloat16 tiles as if they were int16
        h16 = h16.float()
    block_m = 8
    launch(
        _quantize_rotated_rows_kernel, (_cdiv(M, block_m),),
        x, a, b, h16, q, scale, M, K, P, stride_x, stride_a, stride_b, q.stride(0),
        BLOCK_M=block_m, PRECISION="tf32x3" if x.dtype == torch.float32 else "ieee", ACT=kind,
        num_warps=4, enable_fp_fusion=False,
    )
    return q, scale


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row blocks sweep the columns together, so B tiles stay in L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_m
    pid_n = (tile % tiles_per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _add_low_rank(out, lx, lu, ls, offs_m, offs_n, m_ok, n_ok, R, stride_lx, stride_lu, BLOCK_R: tl.constexpr):
    """``out + (lx[rows] · ls) @ lu[cols]ᵀ`` over the rank in blocks of BLOCK_R, float32 accumulation."""
    offs_r = tl.arange(0, BLOCK_R)
    lx_rows = lx + offs_m.to(tl.int64)[:, None] * stride_lx + offs_r[None, :]
    lu_rows = lu + offs_n.to(tl.int64)[:, None] * stride_lu + offs_r[None, :]
    for r in range(0, R, BLOCK_R):
        r_ok = offs_r < R - r
        a = tl.load(lx_rows + r, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        a = (a.to(tl.float32) * tl.load(ls + r + offs_r, mask=r_ok, other=0.0)[None, :]).to(lu.dtype.element_ty)
        b = tl.load(lu_rows + r, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        out = tl.dot(a, tl.trans(b), out, input_precision="ieee")  # "ieee" matters for float32 factors only
    return out


@triton.jit
def _tma_mainloop(
    a, b, b2, pid_m, pid_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GLU: tl.constexpr, STACKED: tl.constexpr, GATE_AFTER: tl.constexpr,
):
    """One tile's int32 ``A @ Bᵀ`` (and ``A @ B2ᵀ`` with ``GLU``, else a placeholder) through tensor
    descriptors (out-of-range reads come back as zeros). ``STACKED``: ``b`` is one descriptor over
    [2, N, K], B then B2 (B2 then B where not ``GATE_AFTER``), so one load and one MMA twice as wide
    compute both products, which are split apart after the loop (an MMA of width 64 re-reads A's tile
    for half the work)."""
    if STACKED:
        both = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.int32)
        for kt in range(tl.cdiv(K, BLOCK_K)):
            a_tile = a.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b_tile = tl.reshape(b.load([0, pid_n * BLOCK_N, kt * BLOCK_K]), (2 * BLOCK_N, BLOCK_K))
            both = tl.dot(a_tile, tl.trans(b_tile), both, out_dtype=tl.int32)
        acc, acc2 = tl.split(tl.permute(tl.reshape(both, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        if not GATE_AFTER:
            acc, acc2 = acc2, acc
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N) if GLU else (1, 1), dtype=tl.int32)
        for kt in range(tl.cdiv(K, BLOCK_K)):
            a_tile = a.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b_tile = b.load([pid_n * BLOCK_N, kt * BLOCK_K])
            acc = tl.dot(a_tile, tl.trans(b_tile), acc, out_dtype=tl.int32)
            if GLU:
                acc2 = tl.dot(a_tile, tl.trans(b2.load([pid_n * BLOCK_N, kt * BLOCK_K])), acc2, out_dtype=tl.int32)
    return acc, acc2


@triton.jit
def _pointer_mainloop(
    a, b, b2, pid_m, pid_n, M, N, K, stride_am, stride_bn, stride_b2n, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, MASK_M: tl.constexpr, GLU: tl.constexpr,
):
    """:func:`_tma_mainloop` through pointers (see ``_scaled_mm_kernel`` for the row wrapping)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = offs_m if MASK_M else offs_m % M
    a_ptrs = a + rows_a.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b + (offs_n % N).to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
    b2_ptrs = b2 + (offs_n % N).to(tl.int64)[:, None] * stride_b2n + offs_k[None, :]
    a_rows_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N) if GLU else (1, 1), dtype=tl.int32)
    for kt in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k[None, :] < K - kt * BLOCK_K
        if EVEN_K:
            a_tile = tl.load(a_ptrs, mask=a_rows_ok, other=0) if MASK_M else tl.load(a_ptrs)
        else:
            a_tile = tl.load(a_ptrs, mask=a_rows_ok & k_ok if MASK_M else k_ok, other=0)
        b_tile = tl.load(b_ptrs) if EVEN_K else tl.load(b_ptrs, mask=k_ok, other=0)
        acc = tl.dot(a_tile, tl.trans(b_tile), acc, out_dtype=tl.int32)
        if GLU:
            b2_tile = tl.load(b2_ptrs) if EVEN_K else tl.load(b2_ptrs, mask=k_ok, other=0)
            acc2 = tl.dot(a_tile, tl.trans(b2_tile), acc2, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        b2_ptrs += BLOCK_K
    return acc, acc2


@triton.jit
def _dequantize(acc, row_scale, col_scale, bias, offs_n, n_ok, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``acc · row_scale[:, None] · col_scale (+ bias)`` in float32: ``col_scale`` one value, or one
    per column with ``PER_CHANNEL``."""
    if PER_CHANNEL:
        out = acc.to(tl.float32) * row_scale[:, None] * tl.load(col_scale + offs_n, mask=n_ok, other=0.0)[None, :]
    else:
        out = acc.to(tl.float32) * (row_scale * tl.load(col_scale))[:, None]
    if HAS_BIAS:
        out += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _store_heads(
    x, c, pid_n, offs_m, m_ok, M, N, norm_w, tables, tokens, eps, BLOCK_M: tl.constexpr, HEAD: tl.constexpr
):
    """Store one head's tile x (float32 [BLOCK_M, HEAD], rows = tokens) of a fused q|k|v projection into
    c [3, batch, tokens, heads, HEAD]. Query and key heads are first RMS-normalized over the head, times
    their weight (``norm_w`` [2, HEAD], any float dtype: queries', keys'), rounded to c's dtype, then
    their channel pairs (2i, 2i+1) rotated in float32 by the token's angles (``tables``: their cosines,
    then their sines, float32 [2, tokens, HEAD / 2]): :func:`engine.heads.attention_inputs`,
    unfused. HEAD is a power of two, at least 16."""
    hidden = N // 3
    part = (pid_n * HEAD) // hidden  # 0 queries, 1 keys, 2 values
    head = (pid_n * HEAD - part * hidden) // HEAD
    token = offs_m % tokens
    if part < 2:
        weight = tl.load(norm_w + part * HEAD + tl.arange(0, HEAD)).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD + eps)
        x = (x * rstd[:, None] * weight[None, :]).to(c.dtype.element_ty).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (BLOCK_M, HEAD // 2, 2)))
        pairs = token.to(tl.int64)[:, None] * (HEAD // 2) + tl.arange(0, HEAD // 2)[None, :]
        cos = tl.load(tables + pairs, mask=m_ok[:, None], other=0.0)
        sin = tl.load(tables + tokens * (HEAD // 2) + pairs, mask=m_ok[:, None], other=0.0)
        x = tl.reshape(tl.join(cos * even - sin * odd, sin * even + cos * odd), (BLOCK_M, HEAD))
    row = (part * M + offs_m) * (hidden // HEAD) + head
    c_ptrs = c + row.to(tl.int64)[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(c_ptrs, x.to(c.dtype.element_ty), mask=m_ok[:, None])


@triton.jit(do_not_specialize=["M"])
def _scaled_mm_kernel(
    a, b, c, a_scale, b_scale, bias, b2, b2_scale, bias2, M, N, K, stride_am, stride_bn, stride_b2n, stride_cm,
    num_programs, lora_x, lora_up, lora_scale, R, stride_lx, stride_lu, norm_w, tables, tokens, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, MASK_M: tl.constexpr, USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr, FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
    STACKED: tl.constexpr, GATE_AFTER: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    HEADS: tl.constexpr,
):
    """C = (A @ Bᵀ) · a_scale[:, None] · b_scale (+ bias) (+ low-rank term). A int8 [M, K], B int8 [N, K],
    both K-major. With ``HAS_LORA`` the epilogue adds ``(lora_x · lora_scale) @ lora_upᵀ`` (lora_x
    [M, R] and lora_up [N, R] in one float dtype, lora_scale float32 [R]). With ``GLU`` (no low-rank
    term) C is ``silu(that) · ((A @ B2ᵀ) · a_scale[:, None] · b2_scale (+ bias2))``, both products rounded
    to C's dtype first, as a SwiGLU after two separate layers rounds them: each tile multiplies its A
    block with the same rows of B and B2, so the two halves of a gated MLP's in-projection never reach
    memory (B2 and B have one shape, and the same kind of scale). ``STACKED`` (TMA only): ``b`` describes
    [2, N, K], B then B2 (B2 then B where not ``GATE_AFTER``; see :func:`_tma_mainloop`). ``HEADS``
    (BLOCK_N = the head size, no gate, no low-rank term): the GEMM is a fused q|k|v projection and its
    tiles go to ``c`` [3, batch, tokens, heads, BLOCK_N] as attention's inputs, queries and keys
    normalized and rotated (:func:`_store_heads`).

    With ``num_programs`` equal to the tile count each program computes one tile; with fewer the
    grid is persistent and each program walks the tiles with that stride. ``a`` and ``b`` are tensor
    descriptors when ``USE_TMA`` (out-of-range reads come back as zeros), pointers otherwise (rows are
    wrapped modulo M and N so loads need no masks; only the store is masked). ``MASK_M`` (M < BLOCK_M)
    masks A's rows instead: wrapping would make the tile's rows all read the same few addresses, which
    made M = 1 half as fast as M = 16 on an H100. ``c`` is a tensor
    descriptor when ``TMA_STORE`` (the copy engine clips the tile at the edges).

    ``WARP_SPECIALIZE`` (sm90+, persistent grid, TMA loads): a producer warp issues the tile loads
    while the other warps run the MMAs and the epilogue, so one tile's epilogue overlaps the next
    tile's loads. ``a`` and ``b`` then come as pointers and the descriptors are made here: with host
    descriptors Triton 3.6 did not finish compiling the specialized loop on sm90 (over 200 s).
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if WARP_SPECIALIZE:
        a = tl.make_tensor_descriptor(a, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b = tl.make_tensor_descriptor(b, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        if GLU:
            b2 = tl.make_tensor_descriptor(b2, shape=[N, K], strides=[stride_b2n, 1], block_shape=[BLOCK_N, BLOCK_K])
    for tile in tl.range(
        tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        if USE_TMA:
            acc, acc2 = _tma_mainloop(a, b, b2, pid_m, pid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, GLU, STACKED, GATE_AFTER)
        else:
            acc, acc2 = _pointer_mainloop(a, b, b2, pid_m, pid_n, M, N, K, stride_am, stride_bn, stride_b2n,
                                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, MASK_M, GLU)
        # The epilogue's offsets are made after the K loop, which lives in a helper: written inline with
        # the offsets made before it, the warp-specialized loop computed wrong tiles (Triton 3.6, H200).
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        row_scale = tl.load(a_scale + offs_m, mask=m_ok, other=0.0)
        out = _dequantize(acc, row_scale, b_scale, bias, offs_n, n_ok, PER_CHANNEL, HAS_BIAS)
        if GLU:
            out_dtype = c.dtype if TMA_STORE else c.dtype.element_ty
            gate = _dequantize(acc2, row_scale, b2_scale, bias2, offs_n, n_ok, PER_CHANNEL, HAS_BIAS)
            out = _swiglu(out.to(out_dtype).to(tl.float32), gate.to(out_dtype).to(tl.float32))
        if HAS_LORA:
            out = _add_low_rank(
                out, lora_x, lora_up, lora_scale, offs_m, offs_n, m_ok, n_ok, R, stride_lx, stride_lu, BLOCK_R
            )
        if HEADS:
            out = out.to(c.dtype.element_ty).to(tl.float32)  # the projection's output, as a layer rounds it
            _store_heads(out, c, pid_n, offs_m, m_ok, M, N, norm_w, tables, tokens, eps, BLOCK_M, BLOCK_N)
        elif TMA_STORE:
            c.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(c.dtype))
        else:
            c_ptrs = c + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, out.to(c.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of ``_scaled_mm_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    persistent: bool = False
    tma: bool = False
    tma_store: bool = False
    warp_specialize: bool = False

    def __post_init__(self) -> None:
        if self.warp_specialize and not (self.tma and self.persistent):
            raise ValueError("a warp-specialized config needs TMA loads and a persistent grid")

    def smem_bytes(self) -> int:
        staged_out = self.block_m * self.block_n * 2 if self.tma_store else 0
        return (self.block_m + self.block_n) * self.block_k * self.num_stages + staged_out


def _tiles(specs: list[tuple[int, ...]], **flags: bool) -> list[TileConfig]:
    return [TileConfig(*spec, **flags) for spec in specs]


# (block_m, block_n, block_k, num_warps, num_stages). K tiles of 128 bytes keep the tensor cores fed;
# small-M configs are GEMV-like: thin M, narrow N for enough programs, long K.
_SMALL_M = [(16, 32, 256, 4, 4), (16, 64, 256, 4, 3), (16, 64, 128, 4, 4), (16, 128, 128, 4, 3)]
_MEDIUM_M = [(64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 128, 128, 8, 3), (32, 128, 128, 4, 4)]
_LARGE_M_AMPERE = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3)]

ARCH_CONFIGS: dict[str, dict[str, list[TileConfig]]] = {
    # sm90: int8 tl.dot lowers to wgmma. The large-M configs are those that won at least one of the
    # 57 benchmark shapes on an H100 out of a sweep of 18 (benchmarks/gemm.py --sweep): TMA loads, a
    # persistent grid for wide N, 128×128 tiles where bigger ones would leave the last wave mostly empty;
    # then two warp-specialized 128×128 configs (4–15% faster at M = 4608 in a probe on an H200, 2026-11-29;
    # with five or six stages they computed wrong values in a later sweep, Triton 3.6).
    "sm90": {
        "small": _tiles(_SMALL_M),
        "medium": _tiles(_MEDIUM_M) + _tiles(_MEDIUM_M[:2], tma=True),
        "large": _tiles([(128, 256, 128, 8, 4)], tma=True, persistent=True)
        + _tiles([(128, 128, 128, 4, 3), (256, 128, 128, 8, 4)], tma=True)
        + _tiles([(128, 128, 128, 4, 3)])
        + _tiles([(128, 256, 128, 8, 3)], tma=True, persistent=True, tma_store=True)
        + _tiles([(128, 128, 128, 4, 4), (128, 128, 128, 4, 3)], tma=True, persistent=True, warp_specialize=True),
    },
    # sm80/86/89 and sm120 (consumer Blackwell): mma.sync, ~100 KB of shared memory except on sm80.
    "sm80": {"small": _tiles(_SMALL_M), "medium": _tiles(_MEDIUM_M), "large": _tiles(_LARGE_M_AMPERE)},
    "sm89": {
        "small": _tiles(_SMALL_M),
        "medium": _tiles(_MEDIUM_M[:1] + _MEDIUM_M[3:]) + _tiles([(64, 128, 64, 4, 4)]),
        "large": _tiles(_LARGE_M_AMPERE[:3]) + _tiles([(64, 256, 64, 4, 4)]),
    },
}
ARCH_CONFIGS["sm120"] = ARCH_CONFIGS["sm89"]


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9:
        return "sm90"
    if major >= 12:
        return "sm120"
    if (major, minor) == (8, 0) or major >= 10:  # sm100 datacenter parts have sm80-class smem
        return "sm80"
    return "sm89"


def m_bucket(m: int) -> int:
    """Tuning bucket for M: the next power of two, at least 16."""
    return max(16, _next_power_of_2(m))


def candidate_configs(arch: str, m: int, gated: bool = False, head: int = 0) -> list[TileConfig]:
    """The architecture's configs for M rows, made gated (:func:`gated_config`) for a gated GEMM, or
    one head wide (:func:`heads_config`) for attention's inputs."""
    size = "small" if m <= 16 else "medium" if m <= 256 else "large"
    configs = ARCH_CONFIGS[arch][size]
    if head:
        return list(dict.fromkeys(heads_config(c, head) for c in configs))
    return [gated_config(c) for c in configs] if gated else configs


class LowRank(NamedTuple):
    """A low-rank term ``(x · scale) @ upᵀ`` for the GEMM epilogue: x [M, r] and up [N, r] in one float
    dtype (unit stride along r), scale float32 [r]."""

    x: torch.Tensor
    up: torch.Tensor
    scale: torch.Tensor


LORA_BLOCK_R = 32
"""Rank columns per MMA in the epilogue: any rank works, in steps of this."""


class Gate(NamedTuple):
    """The second product of a gated GEMM, ``silu(x·Wᵀ) · (x·W₂ᵀ)``: W₂ int8 [N, K] (unit column
    stride), its float32 scale of 1 or N elements, contiguous (the same kind as W's), and a bias or None."""

    w: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None


class Heads(NamedTuple):
    """A fused q|k|v projection's epilogue (``HEADS``): the result becomes attention's inputs [3, batch,
    tokens, heads, head] (token-major: attention's output then is too, and its rows are the output
    projection's input without a copy), queries and keys RMS-normalized per head (``norm``: [2, head], the
    queries' weight then the keys') and rotated (``tables``: :func:`~engine.heads.rotation_tables`)."""

    norm: torch.Tensor
    eps: float
    tables: torch.Tensor

    @property
    def size(self) -> int:
        """The head width: a tile's columns."""
        return self.norm.shape[1]

    @property
    def tokens(self) -> int:
        """Tokens per sample: rows of the rotation tables."""
        return self.tables.shape[1]


def heads_config(config: TileConfig, head: int) -> TileConfig:
    """``config`` with one head per tile (``HEADS`` normalizes a head within its tile), stored with
    pointers, not warp-specialized: on an H200 the specialized loop with this epilogue took 540 µs where
    the plain TMA config took 421 (4608 × 12288 × 4096), and it compiles slowly."""
    return replace(config, block_n=head, tma_store=False, warp_specialize=False)


TMA_MAX_STRIDE = 2**40
"""A tensor descriptor's strides stay under this many bytes (CUDA's ``cuTensorMapEncodeTiled``)."""


def stacked_halves(w: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether one 3-D tensor descriptor can describe ``w`` and ``w2`` as [2, N, K], in one order or the
    other: the same layout, apart in memory by a multiple of 16 bytes and less than
    ``TMA_MAX_STRIDE`` (TMA's stride rules). The halves of a fused SwiGLU in-projection's weight are;
    two layers' weights (Z-Image's w1 and w3) usually are too. A gated GEMM then loads both as one
    tile (``STACKED``)."""
    distance = abs(w2.data_ptr() - w.data_ptr())
    return (
        w2.shape == w.shape and w2.stride() == w.stride() and w.stride(1) == 1 and w2.dtype == w.dtype
        and w.shape[0] * w.stride(0) * w.element_size() <= distance < TMA_MAX_STRIDE and distance % 16 == 0
    )


def epilogue_kind(w: torch.Tensor, gate: Gate | None, heads: Heads | None = None) -> str:
    """What the GEMM computes beyond the plain product, as its tuning key says it: ``""``, ``"glu"`` for
    a gated GEMM, ``"glu-stacked"`` where the gate's weight follows ``w`` in memory
    (:func:`stacked_halves`), ``"heads<size>"`` for attention's inputs."""
    if heads is not None:
        return f"heads{heads.size}"
    if gate is None:
        return ""
    return "glu-stacked" if stacked_halves(w, gate.w) else "glu"


def gated_config(config: TileConfig) -> TileConfig:
    """``config`` for a gated GEMM: half as many columns per tile, so that the two products' tiles take
    the registers and shared memory one tile of ``config`` takes; never warp-specialized (on an H200
    with Triton 3.6 the specialized gated loop computed wrong values whenever a program had several
    tiles, and now and then with one)."""
    return replace(config, block_n=max(16, config.block_n // 2), warp_specialize=False)


def launch_scaled_mm(
    config: TileConfig,
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    num_sms: int = 1,
    lora: LowRank | None = None,
    gate: Gate | None = None,
    heads: Heads | None = None,
    compile_only: bool = False,
) -> None:
    """Run the GEMM with one config (or only compile it). ``w_scale`` is float32 with 1 or N elements,
    contiguous."""
    M, K = q.shape
    N = w.shape[0]
    if heads is not None and (gate is not None or lora is not None or config.block_n != heads.size or config.tma_store):
        raise ValueError("attention's inputs take no gate nor low-rank term, and a heads_config")
    if gate is not None and (lora is not None or gate.scale.numel() != w_scale.numel() or (gate.bias is None) != (bias is None)):
        raise ValueError("a gated GEMM takes no low-rank term, and its two weights the same kinds of scale and bias")
    if gate is not None and config.warp_specialize:
        raise ValueError("a gated GEMM is not warp-specialized (see gated_config)")
    if lora is not None:
        lora_args = (lora.x, lora.up, lora.scale, lora.x.shape[1], lora.x.stride(0), lora.up.stride(0))
    else:  # unused pointers: any tensor will do
        lora_args = (x_scale, x_scale, x_scale, 0, 0, 0)
    tiles = _cdiv(M, config.block_m) * _cdiv(N, config.block_n)
    programs = min(tiles, num_sms) if config.persistent else tiles
    w2, w2_scale, bias2 = gate if gate is not None else (w, w_scale, bias)
    stacked = config.tma and gate is not None and stacked_halves(w, gate.w)
    gate_after = not stacked or gate.w.data_ptr() > w.data_ptr()
    if config.tma and not config.warp_specialize:
        a = TensorDescriptor.from_tensor(q, [config.block_m, config.block_k])
        if stacked:
            first = w if gate_after else w2
            strides = [abs(w2.data_ptr() - w.data_ptr()) // w.element_size(), w.stride(0), 1]
            b = b2 = TensorDescriptor(first, [2, N, K], strides, [2, config.block_n, config.block_k])
        else:
            b, b2 = (TensorDescriptor.from_tensor(t, [config.block_n, config.block_k]) for t in (w, w2))
    else:
        a, b, b2 = q, w, w2
    if config.warp_specialize:  # per launch: Triton keeps the allocator per thread (a ContextVar)
        triton.set_allocator(_descriptor_scratch)
    c = TensorDescriptor.from_tensor(out, [config.block_m, config.block_n]) if config.tma_store else out
    norm, eps, tables = heads if heads is not None else (x_scale, 0.0, x_scale)
    launch(
        _scaled_mm_kernel, (programs,),
        a, b, c, x_scale, w_scale, bias if bias is not None else x_scale, b2, w2_scale,
        bias2 if bias2 is not None else x_scale, M, N, K, q.stride(0), w.stride(0), w2.stride(0), out.stride(0),
        programs, *lora_args, norm, tables, heads.tokens if heads is not None else 1, eps,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, EVEN_K=K % config.block_k == 0, MASK_M=M < config.block_m, USE_TMA=config.tma,
        TMA_STORE=config.tma_store, FLATTEN=config.persistent and not config.warp_specialize,
        WARP_SPECIALIZE=config.warp_specialize, PER_CHANNEL=w_scale.numel() > 1, HAS_BIAS=bias is not None,
        GLU=gate is not None, STACKED=stacked, GATE_AFTER=gate_after, HAS_LORA=lora is not None, BLOCK_R=LORA_BLOCK_R,
        HEADS=heads is not None, num_warps=config.num_warps, num_stages=config.num_stages, compile_only=compile_only,
    )


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory Triton asks for at launch to hold the descriptors a kernel makes itself."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides."""
    return all(
        t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.stride(1) == 1 for t in tensors
    )


def usable(config: TileConfig, q: torch.Tensor, w: torch.Tensor, out: torch.Tensor, gate: Gate | None = None) -> TileConfig:
    """``config`` with the TMA paths these tensors cannot take switched off."""
    tma = config.tma and tma_ok(q, w, *(gate.w,) if gate is not None else ())
    tma_store = config.tma_store and tma_ok(out)
    if (tma, tma_store) == (config.tma, config.tma_store):
        return config
    return replace(config, tma=tma, tma_store=tma_store, warp_specialize=config.warp_specialize and tma)


CHECK_ROWS = 32
"""Output rows, spread over M, that every tuning candidate must reproduce (see ``GemmTuner._benchmark``)."""


def reference_rows(
    rows: torch.Tensor, q, x_scale, w, w_scale, bias=None, lora: LowRank | None = None,
    gate: Gate | None = None, dtype: torch.dtype = torch.float32, heads: Heads | None = None,
) -> torch.Tensor:
    """Rows ``rows`` of ``scaled_mm``'s result in float32 PyTorch, for an output in ``dtype`` (a gated
    GEMM rounds both products to it; attention's inputs in the projection's layout, :func:`head_rows`).
    The weight is widened a block of rows at a time (at most 2²⁴ values, 64 MB), never as a whole."""
    if heads is not None:
        pe = rope_of(heads.tables)
        norm = QKNormRope(*heads.norm, heads.eps, pe[rows % pe.shape[0]][:, None, None])
        projected = reference_rows(rows, q, x_scale, w, w_scale, bias).to(dtype)
        return torch.stack(attention_inputs(projected[:, None], norm), dim=1).flatten(1).float()
    if gate is not None:
        a = reference_rows(rows, q, x_scale, w, w_scale, bias).to(dtype).float()
        b = reference_rows(rows, q, x_scale, gate.w, gate.scale, gate.bias).to(dtype).float()
        return torch.nn.functional.silu(a) * b
    x = q[rows].float()
    block = max(1, 2**24 // w.shape[1])
    acc = torch.cat([x @ part.float().t() for part in w.split(block)], dim=1)
    out = acc * x_scale[rows].float()[:, None] * w_scale.float().reshape(-1)
    if bias is not None:
        out += bias.float()
    if lora is not None:
        out += (lora.x[rows].float() * lora.scale.float()) @ lora.up.float().t()
    return out


def head_rows(out: torch.Tensor) -> torch.Tensor:
    """Attention's inputs [3, batch, tokens, heads, head] (``Heads``) as the projection's rows [M, N] (a copy)."""
    three, batch, tokens, heads, head = out.shape
    return out.permute(1, 2, 0, 3, 4).reshape(batch * tokens, three * heads * head)


def agrees(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a kernel's ``out`` is ``expected`` (float32) up to rounding: within 2⁻⁶ of each value plus
    2⁻⁸ of its row's largest (the kernel rounds the low-rank term's inputs to bf16). Loose for a precision
    test, tight enough to catch a miscompiled kernel; NaN and ±Inf must match exactly."""
    want = expected.to(out.dtype).float()
    got = out.float()
    finite = want.isfinite()
    row_max = want.abs().where(finite, 0).amax(dim=1, keepdim=True)
    close = (got - want).abs() <= want.abs() * 2**-6 + row_max * 2**-8
    same = (got == want) | (got.isnan() & want.isnan())
    return bool(torch.where(finite, close, same).all())


def default_cache_path() -> Path:
    return cache_dir() / "gemm-configs.json"


class GemmTuner:
    """Picks the fastest :class:`TileConfig` per (device, M bucket, N, K) and remembers it on disk.

    The first call of a new shape benchmarks the architecture's candidates on the call's own data
    (a few milliseconds each, after Triton has compiled them all at once: :func:`precompile`), then
    writes the winner to a JSON file keyed by GPU name, Triton version and candidate list. Later
    processes read the file and never re-tune (until one of those changes). Warp-specialized configs
    are not tried for a GEMM with a low-rank term (the epilogue's extra MMA is untested in a
    specialized loop) nor for a gated one (:func:`gated_config`).
    During CUDA graph capture nothing can be timed, so an untuned shape gets its first candidate.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_path()
        self._lock = threading.Lock()
        self._table: dict[str, dict] | None = None
        self._devices: dict[int, tuple[str, int]] = {}  # index -> (cache key, multiprocessors)
        self._chosen: dict[tuple[int, int, int, int], TileConfig] = {}  # the per-call fast path

    def _device(self, device: torch.device) -> tuple[str, int]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._devices:
            props = torch.cuda.get_device_properties(index)
            candidates = zlib.crc32(repr(ARCH_CONFIGS[arch_of(device)]).encode())  # new candidates: tune again
            name = f"{props.name}|triton {triton.__version__}|candidates {candidates:08x}"
            self._devices[index] = (name, props.multi_processor_count)
        return self._devices[index]

    def num_sms(self, device: torch.device) -> int:
        return self._device(device)[1]

    def _load(self) -> dict[str, dict]:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gemm-configs-")
            with os.fdopen(fd, "w") as f:
                json.dump(self._table, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs tuning time next run

    @staticmethod
    def _key(m: int, n: int, k: int, out_bytes: int, lora_bytes: int, epilogue: str) -> str:
        """``"M bucket,N,K"``, plus the output's element size unless 2 and the low-rank factors' if any:
        both change how much shared memory a config needs (a staged fp32 tile, the factors' tiles);
        then the epilogue's kind (:func:`epilogue_kind`), whose kernels differ."""
        out = f",out{out_bytes}" if out_bytes != 2 else ""
        lora = f",lora{lora_bytes}" if lora_bytes else ""
        return f"{m_bucket(m)},{n},{k}{out}{lora}" + (f",{epilogue}" if epilogue else "")

    def cached(
        self, device: torch.device, m: int, n: int, k: int, out_bytes: int = 2, lora_bytes: int = 0,
        epilogue: str = "",
    ) -> TileConfig | None:
        """The remembered config for this shape's bucket, output size, low-rank term and epilogue, if any."""
        key = (device.index or 0, m_bucket(m), n, k, out_bytes, lora_bytes, epilogue)
        if key not in self._chosen:
            with self._lock:
                found = self._load().get(self._device(device)[0], {}).get(self._key(*key[1:]))
            if not found:
                return None
            self._chosen[key] = TileConfig(**found)
        return self._chosen[key]

    def config_for(
        self, q, x_scale, w, w_scale, bias, out, lora: LowRank | None = None, gate: Gate | None = None,
        heads: Heads | None = None,
    ) -> TileConfig:
        M, K = q.shape
        N = w.shape[0]
        sizes = (out.element_size(), lora.up.element_size() if lora is not None else 0, epilogue_kind(w, gate, heads))
        found = self.cached(q.device, M, N, K, *sizes)
        if found:
            return usable(found, q, w, out, gate)
        head = heads.size if heads is not None else 0
        configs = candidate_configs(arch_of(q.device), M, gated=gate is not None, head=head)
        candidates = [usable(c, q, w, out, gate) for c in configs if lora is None or not c.warp_specialize]
        candidates = list(dict.fromkeys(candidates))
        if torch.cuda.is_current_stream_capturing():
            return candidates[0]
        best = self._benchmark(candidates, q, x_scale, w, w_scale, bias, out, lora, gate, heads)
        with self._lock:
            self._load().setdefault(self._device(q.device)[0], {})[self._key(M, N, K, *sizes)] = asdict(best)
            self._save()
        return best

    def _benchmark(self, candidates, q, x_scale, w, w_scale, bias, out, lora, gate, heads) -> TileConfig:
        """The fastest candidate among those that compile and reproduce a PyTorch reference on a few rows:
        a config that a compiler bug makes compute wrong values is dropped with a warning, not chosen."""
        (M, K), N = q.shape, w.shape[0]
        num_sms = self.num_sms(q.device)
        rows = torch.linspace(0, M - 1, min(CHECK_ROWS, M), device=q.device).round().long().unique()
        expected = reference_rows(rows, q, x_scale, w, w_scale, bias, lora, gate, out.dtype, heads)
        timings = {}
        args = (q, x_scale, w, w_scale, bias, out, num_sms, lora, gate, heads)
        precompile(candidates, *args)
        for config in candidates:
            run = functools.partial(launch_scaled_mm, config, *args)
            try:
                timing = triton.testing.do_bench(run, warmup=5, rep=20)
            except torch.OutOfMemoryError:  # the GPU's memory, not the config: the caller's to handle
                raise
            except Exception:  # noqa: BLE001, S112 - out of shared memory, or a feature this GPU/Triton lacks
                continue
            if agrees((out if heads is None else head_rows(out))[rows], expected):
                timings[config] = timing
            else:
                warnings.warn(f"int8 GEMM: {config} computed wrong values for M={M}, N={N}, K={K}; not used",
                              RuntimeWarning, stacklevel=2)
        if not timings:
            raise RuntimeError(f"no int8 GEMM configuration compiles and computes correct values for M={M}, N={N}, K={K}")
        return min(timings, key=timings.get)


def precompile(configs: list[TileConfig], *args) -> None:
    """Compile the GEMM for every config at once, in a thread pool (``launch_scaled_mm``'s arguments
    after the config): Triton spends most of a compilation in LLVM and ptxas, outside the GIL, so a
    fresh machine tunes a shape in about a third of the time (H200 host, its 7 candidates at once:
    Z-Image's four GEMMs 20–21 s → 7 s). Half the CPU's threads at most, so that the user's machine
    stays usable and the compilers' memory stays bounded. A config that does not compile is left to
    fail again, with its error, when timed."""
    if AsyncCompileMode is None:
        return
    workers = max(1, (os.cpu_count() or 2) // 2)
    with ThreadPoolExecutor(workers) as pool, contextlib.ExitStack() as queue:
        try:
            queue.enter_context(AsyncCompileMode(pool, ignore_errors=True))
        except (TypeError, RuntimeError):  # another signature, or a queue already open around this call
            return
        for config in configs:
            try:
                launch_scaled_mm(config, *args, compile_only=True)
            except Exception:  # noqa: BLE001, S112 - the timing loop reports it
                continue


TUNER = GemmTuner()


def scaled_mm(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: TileConfig | None = None,
    lora: LowRank | None = None,
    gate: Gate | None = None,
    heads: Heads | None = None,
) -> torch.Tensor:
    """``(q @ wᵀ) · x_scale[:, None] · w_scale + bias (+ lora)`` in ``out_dtype``; q int8 [M, K], w int8 [N, K].
    With ``gate``: ``silu`` of that times the same product with ``gate``'s weight, scale and bias. With
    ``heads`` (w a fused q|k|v projection, M a whole number of ``heads.tables``' tokens): attention's
    inputs [3, batch, tokens, heads, head] instead (:class:`Heads`).

    ``config`` overrides the tuned choice (tests, the interpreter, benchmarks); with ``heads`` it is
    made one head wide (:func:`heads_config`).
    """
    M, N = q.shape[0], w.shape[0]
    head = heads.size if heads is not None else 0
    if heads is None:
        out = torch.empty(M, N, dtype=out_dtype, device=q.device)
    else:
        out = torch.empty(3, M // heads.tokens, heads.tokens, N // (3 * head), head, dtype=out_dtype, device=q.device)
        config = config and heads_config(config, head)
    if not q.is_cuda:  # Triton's interpreter: nothing to tune
        if lora is not None:  # the interpreter multiplies bfloat16 tiles as if they were int16
            lora = LowRank(lora.x.float(), lora.up.float(), lora.scale)
        config = usable(config or candidate_configs("sm80", M, gated=gate is not None, head=head)[0], q, w, out, gate)
        launch_scaled_mm(config, q, x_scale, w, w_scale, bias, out, 4, lora, gate, heads)
        return out
    if config:
        config = usable(config, q, w, out, gate)
    else:
        config = TUNER.config_for(q, x_scale, w, w_scale, bias, out, lora, gate, heads)
    launch_scaled_mm(config, q, x_scale, w, w_scale, bias, out, TUNER.num_sms(q.device), lora, gate, heads)
    return out
