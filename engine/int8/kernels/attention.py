"""8-bit attention, SageAttention's recipe: ``softmax(Q Kᵀ · sm_scale) V`` with Q Kᵀ as an int8 product.

Two steps, each a kernel:

1. :func:`quantize_blocks` quantizes queries and keys to int8 with one float32 scale per block of tokens of
   one head (``absmax / 127``, the block being the attention tile's: :data:`QUERY_BLOCK` queries,
   :data:`KEY_BLOCK` keys), so a tile of scores is dequantized by two scalars. Keys are smoothed first:
   their mean over the tokens of a head is subtracted. Softmax is invariant to it (it shifts each query's
   scores by one constant), and it takes away what all keys share: in real models large per-channel
   offsets (SageAttention's finding) that a shared int8 grid would otherwise spend its steps on.
   The queries' scale carries ``sm_scale · log2(e)``, so the scores come out ready for ``exp2``.
2. ``_attention_kernel``: one program per block of queries of one head walks the keys in blocks: int8
   ``Q Kᵀ`` with int32 accumulation, dequantized by the two block scales, online softmax in float32
   (FlashAttention's running maximum and sum), ``P V`` with P rounded to the inputs' half-precision dtype
   and float32 accumulation. Token counts need not be multiples of the blocks: the tail is masked.

``fp8_pv`` runs ``P V`` in float8 e4m3 instead (SageAttention 2's recipe), where the GPU multiplies fp8
at twice the half-precision rate (Ada, Hopper, Blackwell): V quantized per channel of a head beforehand
(:func:`quantize_values`), P (at most 1) times 448 rounded to e4m3, the two scales applied after the
loop. With int8 ``Q Kᵀ`` and half-precision ``P V`` attention can be at most 4/3 of half-precision
attention's speed (``P V`` is half the work); with both in 8 bits, twice.

The output is written tokens-major (:func:`~engine.int8.operands.attention_output`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.int8.kernels.runtime import cdiv, launch
from engine.int8.kernels.tokens import _MIN_ABSMAX, _round_half_even
from engine.int8.quantize import MIN_ABSMAX
from engine.int8.operands import attention_output

QUERY_BLOCK = 128
"""Queries per attention tile, and so per query scale."""
KEY_BLOCK = 64
"""Keys per step of a tile's loop, and so per key scale."""
LOG2E = math.log2(math.e)
FP8_MAX = 448.0
"""float8 e4m3's largest finite value: P (at most 1) and each channel of V are scaled to it."""
_FP8_MAX = tl.constexpr(FP8_MAX)


class AttentionTiles(NamedTuple):
    """A launch of the attention kernel: queries per program (and per query scale), keys per step of its
    loop (and per key scale), warps, pipeline stages. The default is :data:`QUERY_BLOCK` × :data:`KEY_BLOCK`
    with 8 warps (4 for head dim 64) and 3 stages; ``benchmarks/attention.py --sweep`` times others."""

    queries: int = QUERY_BLOCK
    keys: int = KEY_BLOCK
    warps: int = 8
    stages: int = 3


@triton.jit(do_not_specialize=["N"])
def _quantize_blocks_kernel(
    x_ptr, mean_ptr, q_ptr, scale_ptr, N, H, stride_xb, stride_xh, stride_xn, scale_factor,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, SMOOTH: tl.constexpr,
):
    """One program per BLOCK tokens of one head: int8 values into ``q`` [batch, heads, N, HEAD_DIM], the
    block's scale (times ``scale_factor``) into ``scale`` [batch, heads, blocks]. ``SMOOTH``: subtract
    ``mean`` [batch, heads, HEAD_DIM] first."""
    block, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = batch.to(tl.int64) * H + head
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    row_ok = rows < N
    x_rows = x_ptr + batch.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh + rows[:, None] * stride_xn
    x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if SMOOTH:  # the tail stays zero: it must not count in the block's absmax
        x = tl.where(row_ok[:, None], x - tl.load(mean_ptr + bh * HEAD_DIM + cols)[None, :], 0.0)
    absmax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), _MIN_ABSMAX)
    q = _round_half_even(x * tl.math.div_rn(127.0, absmax))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
    tl.store(q_ptr + (bh * N + rows)[:, None] * HEAD_DIM + cols[None, :], q, mask=row_ok[:, None])
    tl.store(scale_ptr + bh * tl.cdiv(N, BLOCK) + block, tl.math.div_rn(absmax, 127.0) * scale_factor)


def quantize_blocks(
    x: torch.Tensor, block: int, scale_factor: float = 1.0, smooth: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries or keys ``x`` [batch, heads, tokens, head_dim] as int8 (same shape, contiguous) and one float32
    scale per ``block`` tokens of a head, times ``scale_factor`` ([batch, heads, ⌈tokens / block⌉]);
    with ``smooth``, after subtracting the mean over the tokens of each head."""
    B, H, N, D = x.shape
    q = torch.empty(B, H, N, D, dtype=torch.int8, device=x.device)
    scale = torch.empty(B, H, cdiv(N, block), dtype=torch.float32, device=x.device)
    mean = x.mean(dim=2, dtype=torch.float32) if smooth else x  # unused without smoothing
    launch(
        _quantize_blocks_kernel, (cdiv(N, block), H, B),
        x, mean, q, scale, N, H, x.stride(0), x.stride(1), x.stride(2), scale_factor,
        BLOCK=block, HEAD_DIM=D, SMOOTH=smooth, num_warps=4,
        enable_fp_fusion=False,  # _round_half_even must round the product, not the exact x·r (FMA)
    )
    return q, scale


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``v`` [batch, heads, tokens, head_dim] as float8 e4m3 with one float32 scale per channel of a
    head (its absmax over the tokens / 448): ``(v8, factor)``, factor [batch, heads, head_dim] being the
    scale / 448, what ``P V`` of P scaled by 448 is multiplied by. v8 is stored keys-contiguous ([batch,
    heads, head_dim, tokens] in memory, viewed as v's shape): Hopper's fp8 MMA takes its second operand
    with the reduced dimension contiguous."""
    scale = v.abs().amax(dim=2, keepdim=True).float().clamp(min=MIN_ABSMAX) / FP8_MAX
    v8 = (v.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return v8.transpose(2, 3).contiguous().transpose(2, 3), (scale / FP8_MAX).squeeze(2)


@triton.jit
def _e4m3(x):
    """Non-negative float32 ``x`` (at most 448) rounded to float8 e4m3's grid, to nearest even, in float32
    arithmetic: the interpreter's own fp8 cast rounds some values wrongly (Triton 3.6)."""
    step = tl.math.exp2(tl.maximum(tl.floor(tl.math.log2(x)), -6.0) - 3.0)  # 3 mantissa bits; subnormals
    return _round_half_even(x / step) * step


@triton.jit(do_not_specialize=["N"])
def _attention_kernel(
    q_ptr, q_scale_ptr, k_ptr, k_scale_ptr, v_ptr, v_factor_ptr, o_ptr, N, H, stride_vb, stride_vh, stride_vn,
    stride_vd, stride_ob, stride_oh, stride_on, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """One program per BLOCK_M queries of one head; q and k as :func:`quantize_blocks` writes them, the
    queries' scales holding ``sm_scale · log2(e)``. ``PV_FP8``: v and its factors as
    :func:`quantize_values` gives them (``INTERPRETED``: v widened to float32, P rounded by :func:`_e4m3`)."""
    block, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = batch.to(tl.int64) * H + head
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (bh * N + rows)[:, None] * HEAD_DIM + cols[None, :], mask=(rows < N)[:, None], other=0)
    q_scale = tl.load(q_scale_ptr + bh * tl.cdiv(N, BLOCK_M) + block)
    k_blocks = tl.cdiv(N, BLOCK_N)
    v_head = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running maximum of each query's scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j in range(k_blocks):
        keys = j * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        k = tl.load(k_ptr + (bh * N + keys)[:, None] * HEAD_DIM + cols[None, :], mask=key_ok[:, None], other=0)
        scale = q_scale * tl.load(k_scale_ptr + bh * k_blocks + j)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))  # the first block always has a key: m_i turns finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + keys[:, None] * stride_vn + cols[None, :] * stride_vd, mask=key_ok[:, None], other=0.0)
        # P rounded to V's precision. The second cast is a no-op on the GPU; in the interpreter V comes as
        # float32 (it multiplies half-precision tiles as if they were integers), so P is rounded, then widened.
        if PV_FP8:
            p = p * _FP8_MAX
            p = _e4m3(p) if INTERPRETED else p.to(tl.float8e4nv).to(v.dtype)
        else:
            p = p.to(o_ptr.dtype.element_ty).to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    if PV_FP8:
        out *= tl.load(v_factor_ptr + bh * HEAD_DIM + cols)[None, :]
    o_rows = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + rows[:, None] * stride_on
    tl.store(o_rows + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None])


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float,
    smooth_k: bool = True,
    fp8_pv: bool = False,
    tiles: AttentionTiles | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · sm_scale) v`` with int8 ``q kᵀ`` (module docstring) for float16 or bfloat16 q, k, v
    of one shape [batch, heads, tokens, head_dim], head_dim in
    :data:`~engine.int8.operands.ATTENTION_HEAD_DIMS`. ``smooth_k=False`` quantizes the keys as they are
    (to measure what smoothing buys); ``fp8_pv`` runs ``P V`` in float8 e4m3 (a GPU of compute capability
    8.9 or newer); ``tiles`` overrides the launch (:class:`AttentionTiles`)."""
    B, H, N, D = q.shape
    tiles = tiles or AttentionTiles(warps=8 if D == 128 else 4)
    q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))  # the kernels read rows whole
    q8, q_scale = quantize_blocks(q, tiles.queries, sm_scale * LOG2E)
    k8, k_scale = quantize_blocks(k, tiles.keys, smooth=smooth_k)
    out = attention_output(q)
    v, v_factor = quantize_values(v) if fp8_pv else (v, q_scale)  # (unused without fp8)
    if not q.is_cuda:  # Triton's interpreter (see the kernel's PV step)
        v = v.float()
    launch(
        _attention_kernel, (cdiv(N, tiles.queries), H, B),
        q8, q_scale, k8, k_scale, v, v_factor, out, N, H, *v.stride(), *out.stride()[:3],
        BLOCK_M=tiles.queries, BLOCK_N=tiles.keys, HEAD_DIM=D, PV_FP8=fp8_pv, INTERPRETED=not q.is_cuda,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out
