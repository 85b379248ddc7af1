"""Attention's inputs from a fused q|k|v projection, in plain PyTorch.

A transformer block projects its tokens to queries, keys and values in one linear layer, splits the
result into heads, RMS-normalizes each query and key head (a QK-norm) and rotates them by the token's
position (rotary embedding) before attention. :func:`attention_inputs` computes that chain the way the
models compute it unfused; the int8 GEMM computes the same in its epilogue
(``engine.int8.kernels.gemm._store_heads``), so that the projection's output never reaches memory in the
projection's layout. This module is the
reference for that epilogue and the path of every other backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Rope = torch.Tensor
"""Rotation matrices ``[[cos, -sin], [sin, cos]]`` per token and channel pair: float32 [tokens, head / 2, 2, 2]."""


class QKNormRope(NamedTuple):
    """What happens to queries and keys between the projection and attention: RMSNorm over each head
    with ``eps`` and the queries' and keys' weights [head], then rotation by ``rope``."""

    query_weight: torch.Tensor
    key_weight: torch.Tensor
    eps: float
    rope: Rope


def split_heads(qkv: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``[batch, tokens, 3·hidden]`` → q, k, v as [batch, heads, tokens, head_dim] (views)."""
    q, k, v = qkv.unflatten(-1, (3, -1, head_dim)).permute(2, 0, 3, 1, 4)
    return q, k, v


def apply_rope(x: torch.Tensor, pe: Rope) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x`` [batch, heads, tokens, head_dim] by ``pe`` in float32
    (BFL's formulation: two broadcast multiply-adds, few kernels when not compiled)."""
    pairs = x.float().unflatten(-1, (-1, 1, 2))
    return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).flatten(-2).type_as(x)


def rotation_tables(pe: Rope) -> torch.Tensor:
    """The cosines and sines in ``pe``: float32 [2, tokens, head / 2], contiguous (what the fused epilogue
    reads: a row of each is one contiguous load, where ``pe``'s interleaved matrices took four times the
    memory traffic)."""
    return torch.stack([pe[..., 0, 0], pe[..., 1, 0]]).float().contiguous()


def rope_of(tables: torch.Tensor) -> Rope:
    """:func:`rotation_tables`' inverse: the rotation matrices, bit for bit."""
    cos, sin = tables
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def attention_inputs(qkv: torch.Tensor, norm: QKNormRope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [batch, heads, tokens, head] of a fused projection's output ``qkv`` [batch, tokens,
    3·heads·head]: queries and keys normalized (rounded to qkv's dtype) and rotated."""
    head = norm.query_weight.shape[0]
    q, k, v = split_heads(qkv, head)
    q = apply_rope(F.rms_norm(q, (head,), norm.query_weight, norm.eps), norm.rope)
    k = apply_rope(F.rms_norm(k, (head,), norm.key_weight, norm.eps), norm.rope)
    return q, k, v
