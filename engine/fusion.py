"""The seam between model code and the layers that replace its linears: fused inputs and fused layers.

Model code is plain PyTorch and never knows which kind of linear it runs. Where a computation could
be fused into the linear that follows it, the model does not compute it but declares it, as data:

* :class:`NormedInput`: a projection's input before its norm and modulation;
* :class:`ActivatedInput`: a down-projection's input before its activation (after an optional
  concatenated prefix);
* :func:`attention_heads`: a fused q|k|v projection whose output goes to attention, through a
  QK-norm and rotary embedding (:class:`~engine.heads.QKNormRope`);
* :func:`in_projection`, :func:`swiglu`: an MLP's in-projection followed by its activation.

Attention itself goes through :func:`attention` too: SDPA, unless an implementation was installed on
the model (:func:`install_attention`; ``engine.int8.attention.use_attention`` installs 8-bit attention).

A plain ``nn.Linear`` gets each of these computed the usual way (:meth:`NormedInput.materialize`, …).
A :class:`FusedLinear` (the int8 layers: ``engine.int8.linear.Int8Linear``) takes them as they are and
computes the norm, the activation or attention's inputs inside its own kernels, or says it cannot
(returns None from a ``fused_*`` method) and gets the plain chain. Swapping layers is all a quantizer
does to a model (``engine.int8.apply``), as in torchao's ``quantize_``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.heads import QKNormRope, attention_inputs

NORMS = ("layer", "rms")
"""What a :class:`NormedInput` can apply: ``F.layer_norm``, ``F.rms_norm``."""
ACTIVATIONS = ("swiglu", "gelu_tanh", "identity")
"""What an :class:`ActivatedInput` can apply: ``silu(a) · b``, ``gelu(a, approximate="tanh")``, nothing
(``a`` was activated already: it only follows a prefix)."""

Heads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Attention's inputs q, k, v [batch, heads, tokens, head]."""
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""An attention implementation: ``softmax(q kᵀ / √head) v`` of q, k, v [batch, heads, tokens, head]."""
ATTENTION_ATTRIBUTE = "attention_implementation"
"""The module attribute :func:`install_attention` sets and :func:`attention` reads."""


class ActivatedInput(NamedTuple):
    """A layer input given before its activation: ``cat([prefix, activation(a, b)], -1)``.

    ``b`` is the second half of a gated activation (SwiGLU's ``silu(a) · b``); ``prefix`` a tensor that
    comes before the activated part (a Flux single block's attention output). A fused layer applies
    the activation while it quantizes, so its output is never written out and read back.
    """

    activation: str
    a: torch.Tensor
    b: torch.Tensor | None = None
    prefix: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.a.shape[-1] + (self.prefix.shape[-1] if self.prefix is not None else 0)

    def materialize(self) -> torch.Tensor:
        """The input as one tensor, computed as an unfused layer does (in the input dtype)."""
        if self.activation == "swiglu":
            y = F.silu(self.a) * self.b
        elif self.activation == "gelu_tanh":
            y = F.gelu(self.a, approximate="tanh")
        else:
            y = self.a
        return y if self.prefix is None else torch.cat([self.prefix, y], dim=-1)

    def flattened(self) -> ActivatedInput:
        """The same input with every tensor flattened to 2-D [tokens, channels]."""
        flat = [t.reshape(-1, t.shape[-1]) if t is not None else None for t in (self.a, self.b, self.prefix)]
        return ActivatedInput(self.activation, *flat)


def activated(activation: str, y: torch.Tensor, prefix: torch.Tensor | None = None) -> ActivatedInput:
    """``y`` before ``activation``: a gated activation takes the two halves of ``y`` as ``a`` and ``b``."""
    halves = y.chunk(2, dim=-1) if activation == "swiglu" else (y,)
    return ActivatedInput(activation, *halves, prefix=prefix)


class NormedInput(NamedTuple):
    """A layer input given before its norm and modulation: ``norm(x) · (1 + scale) + shift``.

    ``norm``: ``"layer"`` or ``"rms"`` over the last dimension with ``eps``, times ``weight`` [K] if
    given; ``scale`` and ``shift`` [..., K] or None. A fused layer normalizes, modulates and quantizes
    each token in one kernel, so the normalized tokens are never written out and read back.
    """

    x: torch.Tensor
    norm: str
    eps: float
    weight: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.x.shape[-1]

    def materialize(self) -> torch.Tensor:
        """The input as one tensor, computed as the unfused ops compute it (in the input dtype)."""
        width = (self.width,)
        if self.norm == "rms":
            y = F.rms_norm(self.x, width, self.weight, self.eps)
        else:
            y = F.layer_norm(self.x, width, self.weight, eps=self.eps)
        if self.scale is None:
            return y if self.shift is None else y + self.shift
        mul = 1 + self.scale
        return y * mul if self.shift is None else torch.addcmul(self.shift, y, mul)


Input = torch.Tensor | ActivatedInput | NormedInput
"""A layer input, computed or declared."""


class FusedLinear(nn.Module):
    """A linear layer that takes :data:`Input` as it is, and may compute what follows it.

    Each ``fused_*`` method computes a chain in the layer's own way, or returns None where this
    layer cannot (then the caller runs the plain chain).
    """

    def fused_heads(self, x: Input, norm: QKNormRope) -> Heads | None:
        """Attention's inputs from this q|k|v projection of ``x`` (:func:`attention_heads`)."""
        return None

    def fused_in_projection(
        self, x: Input, head: int, norm: QKNormRope | None
    ) -> tuple[torch.Tensor | Heads | None, torch.Tensor] | None:
        """This layer's first ``head`` outputs (attention's inputs with ``norm``) and the SwiGLU of
        the rest, already activated (:func:`in_projection`)."""
        return None

    def fused_swiglu(self, up: nn.Module, x: Input) -> torch.Tensor | None:
        """``silu(self(x)) · up(x)``, this layer being the gate (:func:`swiglu`)."""
        return None

    def prepared_input(self, x: Input, *others: nn.Module) -> object | None:
        """``x`` prepared once for this layer and ``others``, which all take it and accept what this
        returns (an int8 layer quantizes it once), or None where they cannot share that
        (:func:`shared_input`)."""
        return None


def shared_input(x: Input, *linears: nn.Module) -> Input:
    """``x`` for layers that all take it: prepared once where every one is a :class:`FusedLinear` that
    can share it (:meth:`FusedLinear.prepared_input`), as it is where each would take it its own way,
    else computed once for all of them."""
    if all(isinstance(linear, FusedLinear) for linear in linears):
        prepared = linears[0].prepared_input(x, *linears[1:]) if len(linears) > 1 else None
        return x if prepared is None else prepared
    return x if isinstance(x, torch.Tensor) else x.materialize()


def project(linear: nn.Module, x: Input) -> torch.Tensor:
    """``linear(x)`` for an input that may be declared rather than computed."""
    return linear(shared_input(x, linear))


def attention_heads(linear: nn.Module, x: torch.Tensor | NormedInput, norm: QKNormRope) -> Heads:
    """Attention's inputs q, k, v from a fused q|k|v projection of ``x``, normalized and rotated by
    ``norm`` (:func:`~engine.heads.attention_inputs`)."""
    fused = linear.fused_heads(x, norm) if isinstance(linear, FusedLinear) else None
    return fused if fused is not None else attention_inputs(project(linear, x), norm)


def in_projection(
    linear: nn.Module, activation: str, x: torch.Tensor | NormedInput, head: int = 0, norm: QKNormRope | None = None
) -> tuple[torch.Tensor | Heads | None, ActivatedInput]:
    """``linear(x)`` cut after its first ``head`` outputs: those (None for none; attention's inputs
    with ``norm``), and the rest as ``activation``'s input, not activated yet (a fused layer may
    hand it on activated: an ``"identity"`` input)."""
    if activation == "swiglu" and isinstance(linear, FusedLinear):
        fused = linear.fused_in_projection(x, head, norm)
        if fused is not None:
            out, rest = fused
            return out, ActivatedInput("identity", rest)
    y = project(linear, x)
    out = y[..., :head] if head else None
    return (attention_inputs(out, norm) if norm is not None else out), activated(activation, y[..., head:])


def swiglu(gate: nn.Module, up: nn.Module, x: torch.Tensor | NormedInput) -> ActivatedInput:
    """``silu(gate(x)) · up(x)`` of two separate layers on one input, as a down-projection's input."""
    fused = gate.fused_swiglu(up, x) if isinstance(gate, FusedLinear) else None
    if fused is not None:
        return ActivatedInput("identity", fused)
    x = shared_input(x, gate, up)
    return ActivatedInput("swiglu", gate(x), up(x))


def attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of q, k, v [batch, heads, tokens, head] for the block ``module`` of a model: the
    implementation installed on the model (:func:`install_attention`), else SDPA."""
    implementation = getattr(module, ATTENTION_ATTRIBUTE, None)
    return F.scaled_dot_product_attention(q, k, v) if implementation is None else implementation(q, k, v)


def install_attention(model: nn.Module, implementation: Attention | None) -> None:
    """Run ``model``'s attention with ``implementation`` (None: SDPA again), set before it runs.

    An attribute of each of the model's modules, which the blocks that call :func:`attention` pass in,
    rather than a global or a ``ContextVar``: it holds for this model only, whatever thread runs it
    (two models, two choices, no lock); dynamo reads and guards a module's attribute, so a compiled
    block calls the implementation in its graph (a ``ContextVar.get`` would break the graph) and is
    traced again if the choice changes. Set on every module, so a family's blocks need no base class.
    """
    for module in model.modules():
        if implementation is None:
            module.__dict__.pop(ATTENTION_ATTRIBUTE, None)
        else:
            setattr(module, ATTENTION_ATTRIBUTE, implementation)
