"""What the int8 GEMM and quantization kernels take besides plain tensors, as plain PyTorch types.

* :class:`Int8Weight`: an int8 weight with its scale and bias;
* :class:`Epilogue`: everything the GEMM does after the int8 product — bias, a low-rank term
  (:class:`LowRank`), the gated product with an up weight (SwiGLU), attention's heads
  (:class:`QKNormTables`);
* :class:`SampleNorm`: a :class:`~engine.fusion.NormedInput`'s norm and modulation as the normed
  quantization kernel reads it;
* :func:`attention_output`: the buffer 8-bit attention writes, in the layout every backend gives.

No Triton here: :mod:`engine.int8.ops` builds these on every backend, and the kernels
(:mod:`engine.int8.kernels`) and the fallbacks (:mod:`engine.int8.backends`) take them as they are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Int8Weight(NamedTuple):
    """An int8 weight [N, K] (N output channels), its scale and its bias [N] or None.

    The scale is float: one value (tensor-wise) or one per output channel (``[N]`` or ``[N, 1]``) as
    :func:`~engine.int8.ops.int8_linear` takes it; the kernels take it flattened to float32 with 1 or
    N elements, contiguous."""

    w_int8: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None = None


class LowRank(NamedTuple):
    """A low-rank term ``(x · scale) @ upᵀ`` added in the GEMM's epilogue (dynamic LoRA): x [M, r] (the
    tokens already multiplied by the LoRA's down factor) and up [N, r] in one float dtype (unit stride
    along r), scale float32 [r]."""

    x: torch.Tensor
    up: torch.Tensor
    scale: torch.Tensor


class QKNormTables(NamedTuple):
    """A :class:`~engine.heads.QKNormRope` as the GEMM's heads epilogue reads it: the queries' and the
    keys' norm weights stacked (``norm`` [2, head]), ``eps``, and the rotations as cosine and sine
    tables (``tables``: :func:`~engine.heads.rotation_tables`, float32 [2, tokens, head / 2])."""

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


class Epilogue(NamedTuple):
    """What the GEMM computes after the dequantized product ``(q @ wᵀ) · x_scale · w_scale``, in its
    epilogue, so that nothing in between reaches memory:

    * ``bias`` [N]: added;
    * ``lora``: a :class:`LowRank` term added (dynamic LoRA);
    * ``up``: the gated product (SwiGLU): ``w`` is then the gate's weight, and the result is
      ``silu(gate product) · up product``, both products (each with its bias and low-rank term:
      ``lora``, ``up_lora``) rounded to the output dtype first, as two separate layers round them.
      ``up`` has ``w``'s shape, the same kind of scale, and a bias exactly where ``bias`` is given;
    * ``heads``: ``w`` is a fused q|k|v projection, and the result is attention's inputs [3, batch,
      tokens, heads, head] (token-major), queries and keys RMS-normalized per head and rotated
      (:class:`QKNormTables`; :func:`engine.heads.attention_inputs`, unfused).

    ``heads`` takes no gate; ``up_lora`` comes with ``up`` only. The kernel's launch
    arguments and constexprs (``engine.int8.kernels.launcher``) and the tuner's cache key
    (``engine.int8.kernels.tuner.epilogue_key``) are derived from this one description."""

    bias: torch.Tensor | None = None
    lora: LowRank | None = None
    up: Int8Weight | None = None
    heads: QKNormTables | None = None
    up_lora: LowRank | None = None


class SampleNorm(NamedTuple):
    """A :class:`~engine.fusion.NormedInput`'s norm and modulation as the normed quantization kernel
    reads it: LayerNorm or RMSNorm (``rms``) with ``eps``, times ``weight`` [K] if given, then
    ``· (1 + scale) + shift``, each [batch, K] or None: one row per sample, token t taking row
    ``t // tokens`` (``tokens``: tokens per sample)."""

    rms: bool
    weight: torch.Tensor | None
    eps: float
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    tokens: int


ATTENTION_HEAD_DIMS = (64, 128)
"""The head sizes 8-bit attention is built for (the models here use 128; 64 is the common other one)."""


def attention_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialized attention output for queries ``q`` [batch, heads, tokens, head_dim]: same shape and
    dtype, tokens-major in memory ([batch, tokens, heads, head_dim], as FlashAttention writes it), so the
    models' ``transpose(1, 2).flatten(2)`` before the output projection is a view rather than a copy."""
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2)
