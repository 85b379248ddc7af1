"""One launch of the GEMM kernel with one tile config: its arguments and constexprs, from the
:class:`~engine.int8.operands.Epilogue`."""

from __future__ import annotations

import torch
import triton

from engine.int8.kernels.gemm import _scaled_mm_kernel
from engine.int8.kernels.runtime import TensorDescriptor, cdiv, launch
from engine.int8.kernels.tiles import TileConfig, stacked_halves
from engine.int8.operands import Epilogue, LowRank

LORA_BLOCK_R = 32
"""Rank columns per MMA in the epilogue: any rank works, in steps of this."""


def check_epilogue(config: TileConfig, w_scale: torch.Tensor, epilogue: Epilogue) -> None:
    """Refuse what the kernel cannot compute (``ValueError``): attention's inputs with a gate or without a
    :func:`~engine.int8.kernels.tiles.heads_config`; an up product's low-rank term
    without a gate; a gated GEMM with weights of different scale or bias kinds, or a warp-specialized
    config."""
    bias, lora, up, heads, up_lora = epilogue
    if heads is not None and (up is not None or config.block_n != heads.size or config.tma_store):
        raise ValueError("attention's inputs take no gate, and a heads_config")
    if up_lora is not None and up is None:
        raise ValueError("an up product's low-rank term needs the gated product")
    if up is not None and (up.w_scale.numel() != w_scale.numel() or (up.bias is None) != (bias is None)):
        raise ValueError("a gated GEMM takes its two weights with the same kinds of scale and bias")
    if up is not None and config.warp_specialize:
        raise ValueError("a gated GEMM is not warp-specialized (see gated_config)")


def launch_scaled_mm(
    config: TileConfig,
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out: torch.Tensor,
    epilogue: Epilogue = Epilogue(),
    num_sms: int = 1,
    compile_only: bool = False,
) -> None:
    """Run the GEMM with one config (or only compile it) into ``out``. ``w_scale`` (and the up weight's
    scale) is float32 with 1 or N elements, contiguous. The kernel's epilogue constexprs are
    ``HAS_BIAS``, ``HAS_LORA``, ``GATED`` (``STACKED`` and ``UP_AFTER`` where the up weight follows
    or precedes ``w`` in one descriptor: :func:`~engine.int8.kernels.tiles.stacked_halves`), ``HAS_UP_LORA``
    and ``HEADS``."""
    M, K = q.shape
    N = w.shape[0]
    bias, lora, up, heads, up_lora = epilogue
    if up is not None or heads is not None or up_lora is not None:
        check_epilogue(config, w_scale, epilogue)
    tiles = cdiv(M, config.block_m) * cdiv(N, config.block_n)
    programs = min(tiles, num_sms) if config.persistent else tiles
    up_w, up_scale, up_bias = up if up is not None else (w, w_scale, bias)
    stacked = config.tma and up is not None and stacked_halves(w, up_w)
    up_after = not stacked or up_w.data_ptr() > w.data_ptr()
    if config.tma and not config.warp_specialize:
        a = TensorDescriptor.from_tensor(q, [config.block_m, config.block_k])
        if stacked:
            first = w if up_after else up_w
            strides = [abs(up_w.data_ptr() - w.data_ptr()) // w.element_size(), w.stride(0), 1]
            b = b_up = TensorDescriptor(first, [2, N, K], strides, [2, config.block_n, config.block_k])
        else:
            b, b_up = (TensorDescriptor.from_tensor(t, [config.block_n, config.block_k]) for t in (w, up_w))
    else:
        a, b, b_up = q, w, up_w
    if config.warp_specialize:  # per launch: Triton keeps the allocator per thread (a ContextVar)
        triton.set_allocator(_descriptor_scratch)
    c = TensorDescriptor.from_tensor(out, [config.block_m, config.block_n]) if config.tma_store else out
    norm, eps, tables = heads if heads is not None else (x_scale, 0.0, x_scale)
    launch(
        _scaled_mm_kernel, (programs,),
        a, b, c, x_scale, w_scale, bias if bias is not None else x_scale, b_up, up_scale,
        up_bias if up_bias is not None else x_scale, M, N, K, q.stride(0), w.stride(0), up_w.stride(0), out.stride(0),
        programs, *_low_rank_args(lora, x_scale), *_low_rank_args(up_lora, x_scale), norm, tables,
        heads.tokens if heads is not None else 1, eps,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, EVEN_K=K % config.block_k == 0, MASK_M=M < config.block_m, USE_TMA=config.tma,
        TMA_STORE=config.tma_store, FLATTEN=config.persistent and not config.warp_specialize,
        WARP_SPECIALIZE=config.warp_specialize, PER_CHANNEL=w_scale.numel() > 1, HAS_BIAS=bias is not None,
        GATED=up is not None, STACKED=stacked, UP_AFTER=up_after, HAS_LORA=lora is not None,
        HAS_UP_LORA=up_lora is not None, BLOCK_R=LORA_BLOCK_R,
        HEADS=heads is not None, num_warps=config.num_warps, num_stages=config.num_stages, compile_only=compile_only,
    )


def _low_rank_args(lora: LowRank | None, placeholder: torch.Tensor) -> tuple:
    """A low-rank term's kernel arguments: x, up, scale, rank, x's and up's row strides (without one,
    ``placeholder`` for the unused pointers)."""
    if lora is None:
        return placeholder, placeholder, placeholder, 0, 0, 0
    return lora.x, lora.up, lora.scale, lora.x.shape[1], lora.x.stride(0), lora.up.stride(0)


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory Triton asks for at launch to hold the descriptors a kernel makes itself."""
    return torch.empty(size, dtype=torch.int8, device="cuda")
