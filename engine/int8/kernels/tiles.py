"""The GEMM's tile configurations: per-architecture candidate tables, and what a launch can take.

The tuner (:mod:`engine.int8.kernels.tuner`) times an architecture's candidates for each shape; a
gated GEMM and attention's heads take them reshaped (:func:`gated_config`, :func:`heads_config`), and
operands that TMA cannot describe take them without the descriptor paths (:func:`usable`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.int8.kernels.runtime import next_power_of_2
from engine.int8.operands import Int8Weight


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
    # sm90: int8 tl.dot lowers to wgmma. The large-M configs are those that won a benchmark shape in a
    # sweep (benchmarks/gemm.py --sweep): TMA loads, a persistent grid for wide N, 128×128 tiles where
    # bigger ones would leave the last wave mostly empty; then two warp-specialized 128×128 configs, faster
    # at large M (with five or six stages they computed wrong values, Triton 3.6). docs/PERFORMANCE.md has
    # the sweeps.
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
    """Tuning bucket for M (tokens): the next power of two, at least 16."""
    return max(16, next_power_of_2(m))


def candidate_configs(arch: str, m: int, gated: bool = False, head: int = 0) -> list[TileConfig]:
    """The architecture's configs for M tokens, made gated (:func:`gated_config`) for a gated GEMM, or
    one head wide (:func:`heads_config`) for attention's inputs."""
    size = "small" if m <= 16 else "medium" if m <= 256 else "large"
    configs = ARCH_CONFIGS[arch][size]
    if head:
        return list(dict.fromkeys(heads_config(c, head) for c in configs))
    return [gated_config(c) for c in configs] if gated else configs


def heads_config(config: TileConfig, head: int) -> TileConfig:
    """``config`` with one head per tile (``HEADS`` normalizes a head within its tile), stored with
    pointers, not warp-specialized: the specialized loop with this epilogue was slower than the plain
    TMA config, and it compiles slowly (docs/PERFORMANCE.md)."""
    return replace(config, block_n=head, tma_store=False, warp_specialize=False)


def gated_config(config: TileConfig) -> TileConfig:
    """``config`` for a gated GEMM: half as many columns per tile, so that the two products' tiles take
    the registers and shared memory one tile of ``config`` takes; never warp-specialized (on an H200
    with Triton 3.6 the specialized gated loop computed wrong values whenever a program had several
    tiles, and now and then with one)."""
    return replace(config, block_n=max(16, config.block_n // 2), warp_specialize=False)


TMA_MAX_STRIDE = 2**40
"""A tensor descriptor's strides stay under this many bytes (CUDA's ``cuTensorMapEncodeTiled``)."""


def stacked_halves(w: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether one 3-D tensor descriptor can describe the gate's weight ``w`` and the up weight ``up`` as
    [2, N, K], in one order or the other: the same layout, apart in memory by a multiple of 16 bytes and
    less than ``TMA_MAX_STRIDE`` (TMA's stride rules). The halves of a fused SwiGLU in-projection's
    weight are; two layers' weights (Z-Image's w1 and w3) usually are too. A gated GEMM then loads both
    as one tile (``STACKED``)."""
    distance = abs(up.data_ptr() - w.data_ptr())
    return (
        up.shape == w.shape and up.stride() == w.stride() and w.stride(1) == 1 and up.dtype == w.dtype
        and w.shape[0] * w.stride(0) * w.element_size() <= distance < TMA_MAX_STRIDE and distance % 16 == 0
    )


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides."""
    return all(
        t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.stride(1) == 1 for t in tensors
    )


def usable(config: TileConfig, q: torch.Tensor, w: torch.Tensor, out: torch.Tensor, up: Int8Weight | None = None) -> TileConfig:
    """``config`` with the TMA paths these tensors (``up``: a gated GEMM's up weight) cannot take switched off."""
    tma = config.tma and tma_ok(q, w, *(up.w_int8,) if up is not None else ())
    tma_store = config.tma_store and tma_ok(out)
    if (tma, tma_store) == (config.tma, config.tma_store):
        return config
    return replace(config, tma=tma, tma_store=tma_store, warp_specialize=config.warp_specialize and tma)
