"""8-bit attention as an op: :func:`int8_attention` over ``torch.ops.int8_studio.attention``.

``int8_attention(q, k, v)`` is ``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) for the
models' self-attention over text and image tokens concatenated. On the Triton backend
(:func:`~engine.int8.backends.backend_for`) it runs :func:`engine.int8.kernels.quantized_attention`:
``Q Kᵀ`` in int8 after smoothing K, softmax in float32, ``P V`` in half precision: about 1.3 % relative
L2 error against exact attention on random inputs, where bfloat16 SDPA has 0.2 %
(``tests/test_int8_attention.py``'s ``ERROR_BUDGET`` says why).
The other backends run SDPA itself: no int8 speed-up there, and nothing to gain from imitating the
rounding. Every backend returns the same layout (:func:`~engine.int8.operands.attention_output`).

The op is registered like the GEMM's (:func:`engine.int8.ops.register_op`: a fake implementation for
tracing, no per-call Python wrapper), so compiled models call the same kernel as eager ones without a
graph break. :func:`use_attention` makes a model's attention run it (:func:`engine.fusion.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.fusion import install_attention
from engine.int8.backends import backend_for, kernels
from engine.int8.choices import ATTENTIONS, AttentionChoice
from engine.int8.operands import ATTENTION_HEAD_DIMS, attention_output
from engine.int8.ops import register_op


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    if backend_for(q) == "triton":
        return kernels.quantized_attention(q, k, v, sm_scale)
    return attention_output(q).copy_(F.scaled_dot_product_attention(q, k, v, scale=sm_scale))


attention = register_op(
    "attention(Tensor q, Tensor k, Tensor v, float sm_scale) -> Tensor",
    _attention,
    lambda q, k, v, sm_scale: attention_output(q),
)
"""``softmax(q kᵀ · sm_scale) v`` of q, k, v [batch, heads, tokens, head_dim]: :func:`int8_attention`
without its checks."""


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Attention of float16 or bfloat16 q, k, v of one shape [batch, heads, tokens, head_dim] (head_dim 64
    or 128) with ``sm_scale`` (default ``head_dim ** -0.5``); the output has their shape and dtype."""
    if q.ndim != 4 or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in ATTENTION_HEAD_DIMS:
        raise ValueError(
            f"q must be float16/bfloat16 [batch, heads, tokens, head_dim] with head_dim in {ATTENTION_HEAD_DIMS}, "
            f"got {q.dtype} {tuple(q.shape)}"
        )
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must have one shape and dtype, got {q.dtype} {tuple(q.shape)}, "
            f"{k.dtype} {tuple(k.shape)}, {v.dtype} {tuple(v.shape)}"
        )
    return attention(q, k, v, q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)


def use_attention(model: nn.Module, attention: AttentionChoice) -> None:
    """Run ``model``'s attention in ``"bf16"`` (SDPA, the model's own) or ``"int8"`` (:func:`int8_attention`)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose {' or '.join(ATTENTIONS)}")
    install_attention(model, _model_attention if attention == "int8" else None)


def _model_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`int8_attention` where its kernel takes the head dim (every released model's is 128), SDPA
    where it does not (the tiny test models' 16 and 32), so any model runs with the option on."""
    if q.shape[-1] in ATTENTION_HEAD_DIMS:
        return int8_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
