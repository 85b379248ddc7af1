"""Triton kernels for W8A8 linear layers: per-token int8 quantization and the int8 GEMM.

* :mod:`.runtime`: the Triton version check (importing this package raises ``ImportError`` without
  Triton 3.4+), ``launch`` through a cache of compiled kernels, host-side helpers;
* :mod:`.tokens`: the quantization kernels — plain, activated (:class:`~engine.fusion.ActivatedInput`),
  rotated (Hadamard) and normed (:class:`~engine.int8.operands.SampleNorm`) tokens;
* :mod:`.gemm`: the GEMM kernel, ``(q @ wᵀ) · x_scale · w_scale`` with its epilogue fused;
* :mod:`.tiles`: tile configurations per GPU architecture, and what a launch can take;
* :mod:`.launcher`: one GEMM launch with one config, its arguments derived from the
  :class:`~engine.int8.operands.Epilogue`;
* :mod:`.tuner`: the fastest correct config per (power-of-two bucket of M, N, K, epilogue), tuned on first
  use and kept in a JSON file in the user's cache directory, so a second run starts without tuning;
* :mod:`.entry`: :func:`scaled_mm`, the GEMM as callers run it;
* :mod:`.low_rank`: :func:`low_rank`, a dynamic LoRA's first product from the quantized tokens;
* :mod:`.attention`: :func:`quantized_attention`, attention with an int8 ``Q Kᵀ`` (SageAttention's recipe).

:mod:`engine.int8.ops` calls these on the Triton backend; tests and benchmarks reach the parts directly.
"""

from engine.int8.kernels.runtime import MIN_TRITON, AsyncCompileMode, launch, triton_release  # first: the version check
from engine.int8.kernels.tokens import (
    ROTATION_GROUP,
    SINGLE_PASS_MAX_K,
    quantize_normed_tokens,
    quantize_rotated_tokens,
    quantize_tokens,
)
from engine.int8.kernels.tiles import (
    ARCH_CONFIGS,
    TileConfig,
    arch_of,
    candidate_configs,
    gated_config,
    heads_config,
    m_bucket,
    stacked_halves,
    usable,
)
from engine.int8.kernels.launcher import launch_scaled_mm
from engine.int8.kernels.tuner import (
    TUNER,
    GemmTuner,
    agrees,
    epilogue_key,
    epilogue_kind,
    precompile,
    projection_layout,
    reference_output,
)
from engine.int8.kernels.entry import scaled_mm
from engine.int8.kernels.low_rank import low_rank
from engine.int8.kernels.attention import quantize_blocks, quantize_values, quantized_attention

__all__ = [
    "ARCH_CONFIGS", "MIN_TRITON", "ROTATION_GROUP", "SINGLE_PASS_MAX_K", "TUNER", "AsyncCompileMode", "GemmTuner",
    "TileConfig", "agrees", "arch_of", "candidate_configs", "epilogue_key", "epilogue_kind", "gated_config",
    "heads_config", "launch", "launch_scaled_mm", "low_rank", "m_bucket", "precompile", "projection_layout",
    "quantize_blocks", "quantize_normed_tokens", "quantize_rotated_tokens", "quantize_tokens", "quantize_values",
    "quantized_attention", "reference_output", "scaled_mm", "stacked_halves", "triton_release", "usable",
]
