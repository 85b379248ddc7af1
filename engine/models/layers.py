"""Building blocks of the Flux-family and Z-Image transformers (the runnable modules).

Attribute names follow the single-file (BFL/ComfyUI) layout, so a module's ``state_dict()`` keys are
exactly :meth:`Architecture.tensor_shapes` and a checkpoint loads without renaming. Everything that
runs once per token goes through ``nn.Linear`` (or a layer that replaces it), attention through
:func:`engine.fusion.attention` (SDPA unless the model was given another implementation); norms and rotary embeddings compute in float32 and return the input
dtype. Norms, activations and attention's heads that follow or precede a linear are declared through
:mod:`engine.fusion`, so a fused layer can compute them in its own kernels.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.fusion import NormedInput, activated, attention, attention_heads, in_projection, project
from engine.heads import QKNormRope, Rope

Modulation = tuple[torch.Tensor, ...]  # per-sample vectors [batch, 1, hidden]
Inputs = dict[str, torch.Tensor]  # a model's forward arguments by name


class RMSNorm(nn.Module):
    """RMSNorm with BFL's parameter name (``scale``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)


class QKNorm(nn.Module):
    """RMSNorm of queries and keys over the head dimension (``norm.{query,key}_norm.scale``), applied
    with the rotation through :meth:`rotating`."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def rotating(self, pe: Rope) -> QKNormRope:
        """These norms followed by rotation by ``pe`` (:func:`engine.fusion.attention_heads`)."""
        return QKNormRope(self.query_norm.scale, self.key_norm.scale, self.query_norm.eps, pe)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, as every Flux-family block uses before modulation."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulated(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> NormedInput:
    """``(1 + scale) · layer_norm(x) + shift``, declared (:class:`engine.fusion.NormedInput`)."""
    return NormedInput(x, "layer", 1e-6, scale=scale, shift=shift)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(1 + scale) · layer_norm(x) + shift``, the multiply-add in one kernel."""
    return modulated(x, shift, scale).materialize()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` [batch] → float32 [batch, dim], cosines first (BFL's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_ids(*axes: int | range, device: torch.device | str | None = None) -> torch.Tensor:
    """Every combination of the axes' positions, last axis fastest: [tokens, len(axes)] int64."""
    ranges = [
        torch.arange(a.start, a.stop, device=device)
        if isinstance(a, range)
        else torch.arange(a, device=device)
        for a in axes
    ]
    return torch.stack(torch.meshgrid(*ranges, indexing="ij"), dim=-1).flatten(0, -2)


def rope(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> Rope:
    """Rotary embedding of position ``ids`` [tokens, axes]: each axis rotates ``axes_dims[i]`` channels.

    Angles are computed in float64 (positions reach thousands), the rotations kept in float32. A
    handful of operations for all axes at once: models that take positions as inputs build these
    tables every step, on the host's time before the first block.
    """
    axis, freqs = _rope_frequencies(tuple(axes_dims), float(theta), ids.device)
    angle = ids[:, axis].double() * freqs
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).float()


@functools.cache
def _rope_frequencies(axes_dims: tuple[int, ...], theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For each rotated channel pair, its axis (int64) and frequency (float64): ``theta^(-2i / dim)``
    for pair i of an axis of ``dim`` channels."""
    with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
        axis = torch.cat([torch.full((dim // 2,), i) for i, dim in enumerate(axes_dims)]).to(device)
        freqs = [theta ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim) for dim in axes_dims]
        return axis, torch.cat(freqs).to(device)


def attend(block: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention over [batch, heads, tokens, head_dim] → [batch, tokens, heads·head_dim], as
    ``block``'s model runs it (:func:`engine.fusion.attention`)."""
    return attention(block, q, k, v).transpose(1, 2).flatten(2)


class MLPEmbedder(nn.Module):
    """``out_layer(silu(in_layer(x)))``: Flux's time/guidance embedders and Chroma's approximator layers."""

    def __init__(self, dim_in: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.in_layer = nn.Linear(dim_in, hidden, bias=bias)
        self.out_layer = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class ModulationVectors(nn.Module):
    """``lin(silu(vec))`` split into ``n`` vectors of [batch, 1, hidden] (shift, scale, gate, …): the
    adaLN modulation of Flux.1's blocks (one per block) and Flux.2's (shared by all blocks)."""

    def __init__(self, hidden: int, n: int, bias: bool) -> None:
        super().__init__()
        self.n = n
        self.lin = nn.Linear(hidden, n * hidden, bias=bias)

    def forward(self, vec: torch.Tensor) -> Modulation:
        return self.lin(F.silu(vec))[:, None].chunk(self.n, dim=-1)


class LastLayer(nn.Module):
    """Flux.1 and Flux.2's final layer: modulated by ``vec`` through its own adaLN linear, projected to
    the output channels."""

    def __init__(self, hidden: int, out: int, bias: bool) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=bias))
        self.linear = nn.Linear(hidden, out, bias=bias)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


class Activation(nn.Module):
    """An MLP activation by name (:data:`engine.fusion.ACTIVATIONS`); a gated one takes two halves."""

    name: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activated(self.name, x).materialize()


class SwiGLU(Activation):
    """``silu(a) * b`` of the two halves of a fused in-projection (Flux.2's MLPs)."""

    name = "swiglu"


class GELUTanh(Activation):
    """GELU with the tanh approximation (Flux.1 and Chroma MLPs)."""

    name = "gelu_tanh"


class MLP(nn.Sequential):
    """In-projection, activation, out-projection (single-file keys ``.0`` and ``.2``)."""

    def forward(self, x: torch.Tensor | NormedInput) -> torch.Tensor:
        up, act, down = self
        return project(down, in_projection(up, act.name, x)[1])


class FluxAttention(nn.Module):
    """One stream's attention weights in a double block: ``qkv``, ``norm``, ``proj``."""

    def __init__(self, hidden: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(hidden, hidden, bias=bias)


class DoubleBlock(nn.Module):
    """Flux double-stream block: image and text tokens keep their own weights and attend jointly.

    Modulation comes from outside (Flux.2: shared modulation layers; Chroma: the approximator; Flux.1:
    its subclass adds one linear per stream), as (shift, scale, gate) for attention and again for the
    MLP, per stream.
    """

    def __init__(self, hidden: int, head_dim: int, mlp_in: int, mlp_hidden: int, act: nn.Module, bias: bool):
        super().__init__()
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_attn", FluxAttention(hidden, head_dim, bias))
            mlp = MLP(nn.Linear(hidden, mlp_in, bias=bias), act, nn.Linear(mlp_hidden, hidden, bias=bias))
            self.add_module(f"{stream}_mlp", mlp)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, img_mod: Modulation, txt_mod: Modulation, pe: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = txt.shape[1]  # text tokens come first in the joint sequence and in pe
        txt_qkv = self._qkv(self.txt_attn, txt, txt_mod, pe[:text])
        img_qkv = self._qkv(self.img_attn, img, img_mod, pe[text:])
        out = attend(self, *(torch.cat(pair, dim=2) for pair in zip(txt_qkv, img_qkv)))
        txt_out, img_out = out.split([text, img.shape[1]], dim=1)
        img = self._rest(self.img_attn, self.img_mlp, img, img_out, img_mod)
        txt = self._rest(self.txt_attn, self.txt_mlp, txt, txt_out, txt_mod)
        return img, txt

    @staticmethod
    def _qkv(attn: FluxAttention, x: torch.Tensor, mod: Modulation, pe: Rope):
        shift, scale = mod[0], mod[1]
        return attention_heads(attn.qkv, modulated(x, shift, scale), attn.norm.rotating(pe))

    @staticmethod
    def _rest(attn: FluxAttention, mlp: nn.Module, x: torch.Tensor, out: torch.Tensor, mod: Modulation):
        _, _, gate, shift, scale, mlp_gate = mod
        x = torch.addcmul(x, gate, attn.proj(out))
        return torch.addcmul(x, mlp_gate, mlp(modulated(x, shift, scale)))


class SingleBlock(nn.Module):
    """Flux single-stream ("parallel") block: one fused in-projection feeds attention and the MLP,
    one fused out-projection (``linear2``) merges them. Modulation is (shift, scale, gate)."""

    def __init__(self, hidden: int, head_dim: int, mlp_in: int, mlp_hidden: int, act: nn.Module, bias: bool):
        super().__init__()
        self.split = (3 * hidden, mlp_in)
        self.linear1 = nn.Linear(hidden, 3 * hidden + mlp_in, bias=bias)
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden, bias=bias)
        self.norm = QKNorm(head_dim)
        self.act = act

    def forward(self, x: torch.Tensor, mod: Modulation, pe: Rope) -> torch.Tensor:
        shift, scale, gate = mod
        attention_input = self.norm.rotating(pe)
        (q, k, v), mlp = in_projection(self.linear1, self.act.name, modulated(x, shift, scale), self.split[0], attention_input)
        out = project(self.linear2, mlp._replace(prefix=attend(self, q, k, v)))
        return torch.addcmul(x, gate, out)
