"""A dynamic LoRA's first product from the quantized tokens: ``(q · x_scale) @ downᵀ``.

The GEMM's epilogue adds the low-rank term ``(x · downᵀ · scale) · upᵀ``; its thin first factor
``x · downᵀ`` [M, r] is computed here from the int8 tokens the GEMM multiplies, not from the float
input. The input then needs no float copy besides its quantization: a norm, an activation or a gate
applied on the way into the quantization kernel stays fused with a LoRA on the layer, and the kernel
reads one byte per input value instead of two. The LoRA acts on the same int8 tokens as the weight it
adapts, as it does merged into that weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.int8.kernels.runtime import cdiv, launch, next_power_of_2


@triton.jit(do_not_specialize=["M"])
def _low_rank_kernel(
    q, x_scale, down, out, M, K, R, stride_qm, stride_dr, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out[M, R] = (q[M, K] @ down[R, K]ᵀ) · x_scale[:, None], the int8 tokens widened to down's dtype
    (exact: |q| ≤ 127) and multiplied with float32 accumulation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, r_ok = offs_m < M, offs_r < R
    q_ptrs = q + offs_m.to(tl.int64)[:, None] * stride_qm + offs_k[None, :]
    d_ptrs = down + offs_r.to(tl.int64)[:, None] * stride_dr + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (offs_k < K - k)[None, :] | EVEN_K
        a = tl.load(q_ptrs, mask=m_ok[:, None] & k_ok, other=0).to(down.dtype.element_ty)
        b = tl.load(d_ptrs, mask=r_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")  # "ieee" matters for float32 factors only
        q_ptrs += BLOCK_K
        d_ptrs += BLOCK_K
    acc *= tl.load(x_scale + offs_m, mask=m_ok, other=0.0)[:, None]
    o_ptrs = out + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :]
    tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


def low_rank(q: torch.Tensor, x_scale: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``(q · x_scale[:, None]) @ downᵀ`` in down's dtype: q int8 [M, K] with float32 token scales [M],
    down [r, K] (unit stride along K). A token with a NaN scale (one that held NaN or ±Inf) gives NaN."""
    if not q.is_cuda and down.dtype != torch.float32:  # the interpreter multiplies bfloat16 tiles as int16
        return low_rank(q, x_scale, down.float()).to(down.dtype)
    (M, K), R = q.shape, down.shape[0]
    out = torch.empty(M, R, dtype=down.dtype, device=q.device)
    block_m, block_r, block_k = 16 if M <= 16 else 32, min(64, max(16, next_power_of_2(R))), 128
    launch(
        _low_rank_kernel, (cdiv(M, block_m), cdiv(R, block_r)),
        q, x_scale, down, out, M, K, R, q.stride(0), down.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=4, num_stages=3,
    )  # fmt: skip
    return out
