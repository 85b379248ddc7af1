"""``scaled_mm``: the GEMM as callers run it — the output allocated, a tuned config chosen, one launch."""

from __future__ import annotations

import torch

from engine.int8.kernels.launcher import launch_scaled_mm
from engine.int8.kernels.tiles import TileConfig, candidate_configs, heads_config, usable
from engine.int8.kernels.tuner import TUNER
from engine.int8.operands import Epilogue, LowRank


def scaled_mm(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    epilogue: Epilogue = Epilogue(),
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``(q @ wᵀ) · x_scale[:, None] · w_scale`` and its :class:`~engine.int8.operands.Epilogue` in
    ``out_dtype``; q int8 [M, K] (M tokens), w int8 [N, K] (N channels), w_scale float32 with 1 or N
    elements, contiguous. The result is [M, N], or with ``epilogue.heads`` (w a fused q|k|v projection,
    M a whole number of the tables' tokens) attention's inputs [3, batch, tokens, heads, head].

    ``config`` overrides the tuned choice (tests, the interpreter, benchmarks); with ``heads`` it is
    made one head wide (:func:`~engine.int8.kernels.tiles.heads_config`).
    """
    M, N = q.shape[0], w.shape[0]
    up, heads = epilogue.up, epilogue.heads
    head = heads.size if heads is not None else 0
    if heads is None:
        out = torch.empty(M, N, dtype=out_dtype, device=q.device)
    else:
        out = torch.empty(3, M // heads.tokens, heads.tokens, N // (3 * head), head, dtype=out_dtype, device=q.device)
        config = config and heads_config(config, head)
    if not q.is_cuda:  # Triton's interpreter: nothing to tune
        # the interpreter multiplies bfloat16 tiles as if they were int16
        widened = {name: LowRank(t.x.float(), t.up.float(), t.scale) for name, t in
                   (("lora", epilogue.lora), ("up_lora", epilogue.up_lora)) if t is not None}  # fmt: skip
        epilogue = epilogue._replace(**widened)
        config = usable(config or candidate_configs("sm80", M, gated=up is not None, head=head)[0], q, w, out, up)
        launch_scaled_mm(config, q, x_scale, w, w_scale, out, epilogue, 4)
        return out
    if config:
        config = usable(config, q, w, out, up)
    else:
        config = TUNER.config_for(q, x_scale, w, w_scale, out, epilogue)
    launch_scaled_mm(config, q, x_scale, w, w_scale, out, epilogue, TUNER.num_sms(q.device))
    return out
