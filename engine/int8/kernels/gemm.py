"""The int8 GEMM kernel: ``out = (q @ wᵀ) · x_scale[token] · w_scale[channel]``, then its epilogue.

int32 accumulation, the dequantization fused into the epilogue so that the int32 product never reaches
memory, and whatever else the :class:`~engine.int8.operands.Epilogue` asks for in the same pass: a bias,
a low-rank term (dynamic LoRA: a bf16 MMA of depth r per tile, instead of a second [M, N] product
written, read back and added; its first factor comes from :mod:`.low_rank`), the gated product (each
tile multiplies its tokens with the gate's and the up weight's channels and stores ``silu(gate) · up``:
a SwiGLU in-projection whose two halves never reach memory), or attention's inputs (a fused q|k|v
projection's tiles stored as normalized, rotated heads). Launched by
:func:`engine.int8.kernels.launcher.launch_scaled_mm`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.int8.kernels.tokens import swiglu


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
    a, b, up, pid_m, pid_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, STACKED: tl.constexpr, UP_AFTER: tl.constexpr,
):
    """One tile's int32 ``A @ Bᵀ`` (and ``A @ Uᵀ`` with ``GATED``, U the up weight, else a placeholder)
    through tensor descriptors (out-of-range reads come back as zeros). ``STACKED``: ``b`` is one
    descriptor over [2, N, K], B then U (U then B where not ``UP_AFTER``), so one load and one MMA twice
    as wide compute both products, which are split apart after the loop (an MMA of width 64 re-reads A's
    tile for half the work)."""
    if STACKED:
        both = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.int32)
        for kt in range(tl.cdiv(K, BLOCK_K)):
            a_tile = a.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b_tile = tl.reshape(b.load([0, pid_n * BLOCK_N, kt * BLOCK_K]), (2 * BLOCK_N, BLOCK_K))
            both = tl.dot(a_tile, tl.trans(b_tile), both, out_dtype=tl.int32)
        acc, acc_up = tl.split(tl.permute(tl.reshape(both, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        if not UP_AFTER:
            acc, acc_up = acc_up, acc
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N) if GATED else (1, 1), dtype=tl.int32)
        for kt in range(tl.cdiv(K, BLOCK_K)):
            a_tile = a.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b_tile = b.load([pid_n * BLOCK_N, kt * BLOCK_K])
            acc = tl.dot(a_tile, tl.trans(b_tile), acc, out_dtype=tl.int32)
            if GATED:
                acc_up = tl.dot(a_tile, tl.trans(up.load([pid_n * BLOCK_N, kt * BLOCK_K])), acc_up, out_dtype=tl.int32)
    return acc, acc_up


@triton.jit
def _pointer_mainloop(
    a, b, up, pid_m, pid_n, M, N, K, stride_am, stride_bn, stride_upn, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, MASK_M: tl.constexpr, GATED: tl.constexpr,
):
    """:func:`_tma_mainloop` through pointers (see ``_scaled_mm_kernel`` for the row wrapping)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = offs_m if MASK_M else offs_m % M
    a_ptrs = a + rows_a.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b + (offs_n % N).to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
    up_ptrs = up + (offs_n % N).to(tl.int64)[:, None] * stride_upn + offs_k[None, :]
    a_rows_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N) if GATED else (1, 1), dtype=tl.int32)
    for kt in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k[None, :] < K - kt * BLOCK_K
        if EVEN_K:
            a_tile = tl.load(a_ptrs, mask=a_rows_ok, other=0) if MASK_M else tl.load(a_ptrs)
        else:
            a_tile = tl.load(a_ptrs, mask=a_rows_ok & k_ok if MASK_M else k_ok, other=0)
        b_tile = tl.load(b_ptrs) if EVEN_K else tl.load(b_ptrs, mask=k_ok, other=0)
        acc = tl.dot(a_tile, tl.trans(b_tile), acc, out_dtype=tl.int32)
        if GATED:
            up_tile = tl.load(up_ptrs) if EVEN_K else tl.load(up_ptrs, mask=k_ok, other=0)
            acc_up = tl.dot(a_tile, tl.trans(up_tile), acc_up, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    return acc, acc_up


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
    a, b, c, a_scale, b_scale, bias, up, up_scale, up_bias, M, N, K, stride_am, stride_bn, stride_upn, stride_cm,
    num_programs, lora_x, lora_up, lora_scale, R, stride_lx, stride_lu, up_lora_x, up_lora_up, up_lora_scale, R_UP,
    stride_ulx, stride_ulu, norm_w, tables, tokens, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, MASK_M: tl.constexpr, USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr, FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    STACKED: tl.constexpr, UP_AFTER: tl.constexpr, HAS_LORA: tl.constexpr, HAS_UP_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr, HEADS: tl.constexpr,
):
    """C = (A @ Bᵀ) · a_scale[:, None] · b_scale (+ bias) (+ low-rank term). A int8 [M, K], B int8 [N, K],
    both K-major. With ``HAS_LORA`` the epilogue adds ``(lora_x · lora_scale) @ lora_upᵀ`` (lora_x
    [M, R] and lora_up [N, R] in one float dtype, lora_scale float32 [R]). With ``GATED`` B is the gate's
    weight and C is ``silu(that) · ((A @ Uᵀ) · a_scale[:, None] · up_scale (+ up_bias) (+ up low-rank
    term))`` with U (``up``) the up weight and, with ``HAS_UP_LORA``, the up product's own low-rank term
    (``up_lora_*``, rank R_UP); both products are rounded to C's dtype first, as a SwiGLU after two
    separate layers rounds them. Each tile multiplies its A block with the same channels of B and U, so
    the two halves of a gated MLP's in-projection never reach memory (U and B have one shape, and the
    same kind of scale). ``STACKED`` (TMA only): ``b`` describes [2, N, K], B then U (U then B where not ``UP_AFTER``;
    see :func:`_tma_mainloop`). ``HEADS``
    (BLOCK_N = the head size, no gate): the GEMM is a fused q|k|v projection and its
    tiles go to ``c`` [3, batch, tokens, heads, BLOCK_N] as attention's inputs, queries and keys
    normalized and rotated (:func:`_store_heads`).

    With ``num_programs`` equal to the tile count each program computes one tile; with fewer the
    grid is persistent and each program walks the tiles with that stride. ``a`` and ``b`` are tensor
    descriptors when ``USE_TMA`` (out-of-range reads come back as zeros), pointers otherwise (rows are
    wrapped modulo M and N so loads need no masks; only the store is masked). ``MASK_M`` (M < BLOCK_M)
    masks A's rows instead: wrapping would make the tile's rows all read the same few addresses, which
    made few tokens slow (docs/PERFORMANCE.md). ``c`` is a tensor descriptor when ``TMA_STORE`` (the copy
    engine clips the tile at the edges).

    ``WARP_SPECIALIZE`` (sm90+, persistent grid, TMA loads): a producer warp issues the tile loads
    while the other warps run the MMAs and the epilogue, so one tile's epilogue overlaps the next
    tile's loads. ``a`` and ``b`` then come as pointers and the descriptors are made here: with host
    descriptors Triton 3.6 did not finish compiling the specialized loop on sm90.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if WARP_SPECIALIZE:
        a = tl.make_tensor_descriptor(a, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b = tl.make_tensor_descriptor(b, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        if GATED:
            up = tl.make_tensor_descriptor(up, shape=[N, K], strides=[stride_upn, 1], block_shape=[BLOCK_N, BLOCK_K])
    for tile in tl.range(
        tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        if USE_TMA:
            acc, acc_up = _tma_mainloop(a, b, up, pid_m, pid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, GATED, STACKED, UP_AFTER)
        else:
            acc, acc_up = _pointer_mainloop(a, b, up, pid_m, pid_n, M, N, K, stride_am, stride_bn, stride_upn,
                                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, MASK_M, GATED)
        # The epilogue's offsets are made after the K loop, which lives in a helper: written inline with
        # the offsets made before it, the warp-specialized loop computed wrong tiles (Triton 3.6, H200).
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        row_scale = tl.load(a_scale + offs_m, mask=m_ok, other=0.0)
        out = _dequantize(acc, row_scale, b_scale, bias, offs_n, n_ok, PER_CHANNEL, HAS_BIAS)
        if HAS_LORA:
            out = _add_low_rank(
                out, lora_x, lora_up, lora_scale, offs_m, offs_n, m_ok, n_ok, R, stride_lx, stride_lu, BLOCK_R
            )
        if GATED:
            out_dtype = c.dtype if TMA_STORE else c.dtype.element_ty
            up_out = _dequantize(acc_up, row_scale, up_scale, up_bias, offs_n, n_ok, PER_CHANNEL, HAS_BIAS)
            if HAS_UP_LORA:
                up_out = _add_low_rank(up_out, up_lora_x, up_lora_up, up_lora_scale, offs_m, offs_n, m_ok, n_ok, R_UP,
                                       stride_ulx, stride_ulu, BLOCK_R)  # fmt: skip
            out = swiglu(out.to(out_dtype).to(tl.float32), up_out.to(out_dtype).to(tl.float32))
        if HEADS:
            out = out.to(c.dtype.element_ty).to(tl.float32)  # the projection's output, as a layer rounds it
            _store_heads(out, c, pid_n, offs_m, m_ok, M, N, norm_w, tables, tokens, eps, BLOCK_M, BLOCK_N)
        elif TMA_STORE:
            c.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(c.dtype))
        else:
            c_ptrs = c + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, out.to(c.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

