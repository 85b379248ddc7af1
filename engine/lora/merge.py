"""Merging a stack of LoRAs into a model's weights, and the job that writes the merged model.

Each weight is patched in float32 (on the GPU when there is one) by every LoRA in turn and rounded
once. int8 weights are merged in one of three modes:

- ``requant``: dequantize, patch, quantize again with fresh scales of the same scheme (tensor-wise
  or row-wise). Every value is rounded to nearest on the new grid: the lowest error for changes of
  an int8 step or more, but a change under half a step is rounded away (most LoRAs on tensor-wise
  models), and the LoRA is silently not merged.
- ``stochastic``: keep the existing scale and add the change in the int8 grid with stochastic
  rounding (``floor(Δ/scale + u)``, u uniform, seeded per layer so the output is reproducible):
  unbiased, so small changes survive on average instead of rounding away, at the cost of noise;
  untouched values stay bit-identical. Values pushed past ±127 are clamped and counted.
- ``auto`` (the default): ``requant`` where it keeps at least :data:`AUTO_KEEPS` of the layer's
  change, ``stochastic`` elsewhere.

Each int8 weight's result is measured against the float merge: the rms error and the fraction of
the change kept (the merged change projected onto the float one), which shows a dropped LoRA.

Float weights (bf16, fp16, fp32 layers, and fp8 layers, which the plan dequantizes to bf16) get the
patched float32 weight rounded to their dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.int8.quantize import QMAX, dequantize_weight, quantize_weight
from engine.int8.rotation import rotate
from engine.lora.delta import apply_
from engine.lora.files import LoraFile
from engine.lora.mapping import Patch

Mode = Literal["auto", "requant", "stochastic"]
MODES: tuple[Mode, ...] = ("auto", "requant", "stochastic")

# auto: the fraction of a layer's change that re-quantizing must keep to be used there. Rounding to
# nearest drops changes under half an int8 step, and losing the LoRA's effect systematically is
# worse than the zero-mean noise stochastic rounding adds, which averages out over the many weights
# each output sums. Requant keeps 90% of a normally distributed change of rms 0.4 step, and from
# there on its error is also below stochastic rounding's (0.7 vs 1.0 of the change at 0.4 step).
AUTO_KEEPS = 0.9

Applied = tuple[LoraFile, Patch, float]  # a patch, the file it reads from, its strength


@dataclass(frozen=True)
class LayerStats:
    """One int8 weight against its float merge."""

    error: float  # rms error / rms change
    kept: float  # the fraction of the change kept: 1 = all of it, 0 = rounded away
    mode: str  # the mode used: "requant" or "stochastic"


@dataclass
class MergeStats:
    """How far the int8 result is from the float merge, summed over int8 weights."""

    layers: int = 0
    clipped: int = 0  # stochastic mode: values clamped at ±127
    error_sq: float = 0.0  # Σ (merged int8 dequantized − float merge)²
    change_sq: float = 0.0  # Σ (float merge − original)²
    kept_dot: float = 0.0  # Σ (merged int8 dequantized − original)·(float merge − original)
    modes: Counter[str] = field(default_factory=Counter)  # layers per mode used
    per_layer: dict[str, LayerStats] = field(default_factory=dict)

    @property
    def relative_error(self) -> float:
        """rms error against the float merge, as a fraction of the rms change the LoRAs make."""
        return _relative_error(self.error_sq, self.change_sq)

    @property
    def kept(self) -> float:
        """The fraction of the LoRAs' change the int8 weights keep (1.0 when there is no change)."""
        return _kept(self.kept_dot, self.change_sq)

    def add(self, name: str, mode: str, error_sq: float, change_sq: float, kept_dot: float) -> None:
        self.layers += 1
        self.error_sq += error_sq
        self.change_sq += change_sq
        self.kept_dot += kept_dot
        self.modes[mode] += 1
        error, kept = _relative_error(error_sq, change_sq), _kept(kept_dot, change_sq)
        self.per_layer[name] = LayerStats(error, kept, mode)


def patch_(weight: torch.Tensor, applied: Sequence[Applied]) -> torch.Tensor:
    """Apply every patch, in order, to the float32 ``weight`` (in place)."""
    for lora, patch, strength in applied:
        if len(patch.segments) == 1:
            s = patch.segments[0]
            apply_(weight.narrow(0, s.dst, s.length), lora, patch.layer, patch.part, strength)
            continue
        rows = torch.cat([weight[s.dst : s.dst + s.length] for s in patch.segments])
        apply_(rows, lora, patch.layer, patch.part, strength)
        for s in patch.segments:
            weight[s.dst : s.dst + s.length] = rows[s.src : s.src + s.length]
    return weight


def merge_float(tensor: torch.Tensor, applied: Sequence[Applied], device: torch.device) -> torch.Tensor:
    """A float tensor with the patches applied, rounded once to its own dtype, on the CPU."""
    return patch_(tensor.to(device, torch.float32), applied).to(tensor.dtype).cpu()


def merge_int8(
    name: str,
    q: torch.Tensor,
    scale: torch.Tensor,
    applied: Sequence[Applied],
    mode: Mode,
    seed: int,
    stats: MergeStats,
    device: torch.device,
    rotation: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 weight, scale)`` with the patches applied; the scale keeps its shape ([], [out, 1], …).

    A weight stored Hadamard-rotated (``rotation``: its group size) is merged in its stored basis:
    the LoRAs' change is computed on the un-rotated weight, then rotated like the weight was."""
    q, scale = q.to(device), scale.to(device)
    original = dequantize_weight(q, scale)
    change = _change(original, applied, rotation)
    generator = torch.Generator(device).manual_seed(_layer_seed(seed, name))
    rounded = round_change(q, scale, change, mode, generator, original)
    stats.clipped += rounded.clipped
    stats.add(name, rounded.mode, rounded.error_sq, rounded.change_sq, rounded.kept_dot)
    return rounded.q.cpu(), rounded.scale.cpu()


@dataclass(frozen=True)
class Rounded:
    """An int8 weight with a change merged in (:func:`round_change`), measured against the float merge."""

    q: torch.Tensor  # int8, the input's shape
    scale: torch.Tensor  # the input scale's shape; the input scale itself in stochastic mode
    mode: str  # the mode used: "requant" or "stochastic"
    error_sq: float  # Σ (merged int8 dequantized − float merge)²
    change_sq: float  # Σ change²
    kept_dot: float  # Σ (merged int8 dequantized − original)·change
    clipped: int  # stochastic mode: values clamped at ±127


def round_change(
    q: torch.Tensor,
    scale: torch.Tensor,
    change: torch.Tensor,
    mode: Mode,
    generator: torch.Generator,
    original: torch.Tensor | None = None,
) -> Rounded:
    """``q × scale + change`` back on an int8 grid by ``mode`` (module docstring): ``requant`` with a
    fresh scale of the same kind, ``stochastic`` on the existing grid (:func:`stochastic_requantize`,
    drawing from ``generator``), ``auto`` requant where it keeps :data:`AUTO_KEEPS` of the change.

    ``change`` is float32 in the basis the weight is stored in (rotated like it); it is not modified.
    ``original`` is ``q × scale`` when the caller has it already."""
    original = dequantize_weight(q, scale) if original is None else original
    change_sq = float(change.square().sum())
    if mode not in MODES:
        raise ValueError(f"unknown merge mode {mode!r}; choose {', '.join(MODES)}")
    if mode != "stochastic":
        scheme = "tensorwise" if scale.numel() == 1 else "rowwise"
        new_q, new_scale = (t.to(q.device) for t in quantize_weight(original + change, scheme, q.device))
        new_scale = new_scale.reshape(scale.shape)
        error_sq, kept_dot = _against(new_q, new_scale, original, change)
        if mode == "requant" or _kept(kept_dot, change_sq) >= AUTO_KEEPS:
            return Rounded(new_q, new_scale, "requant", error_sq, change_sq, kept_dot, 0)
    new_q, clipped = stochastic_requantize(q, scale, change.clone(), generator)
    error_sq, kept_dot = _against(new_q, scale, original, change)
    return Rounded(new_q, scale, "stochastic", error_sq, change_sq, kept_dot, clipped)


def _change(stored: torch.Tensor, applied: Sequence[Applied], rotation: int) -> torch.Tensor:
    """What the patches add to a weight, in the basis it is stored in. The rotation is applied to
    the change only, so untouched values get no float32 noise from a round trip."""
    weight = rotate(stored, rotation) if rotation else stored
    change = patch_(weight.clone(), applied).sub_(weight)
    return rotate(change, rotation) if rotation else change


def _against(
    q: torch.Tensor, scale: torch.Tensor, original: torch.Tensor, change: torch.Tensor
) -> tuple[float, float]:
    """``(Σ error², Σ moved·change)`` of the int8 weight ``q × scale`` against the float merge
    ``original + change``, where ``moved`` is how far it is from ``original``. The sums are torch's
    float32 sums (pairwise, unlike float32 dot products), added up across layers as Python floats."""
    moved = dequantize_weight(q, scale).sub_(original)
    kept_dot = float((moved * change).sum())
    return float(moved.sub_(change).square_().sum()), kept_dot


def _relative_error(error_sq: float, change_sq: float) -> float:
    return math.sqrt(error_sq / change_sq) if change_sq else 0.0


def _kept(kept_dot: float, change_sq: float) -> float:
    return kept_dot / change_sq if change_sq else 1.0


def stochastic_requantize(
    q: torch.Tensor, scale: torch.Tensor, change: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Fixed-grid stochastic requantization: ``q + floor(change / scale + u)`` clamped to ±127 (u
    uniform in [0, 1): unbiased rounding, and a zero change leaves ``q`` exactly), and how many values
    were clamped. ``change`` is consumed."""
    steps = change.div_(_per_row(scale))
    steps.add_(torch.rand(steps.shape, generator=generator, device=steps.device)).floor_().add_(q)
    clipped = int((steps.abs() > QMAX).sum())
    return steps.clamp_(-QMAX, QMAX).to(torch.int8), clipped


def _per_row(scale: torch.Tensor) -> torch.Tensor:
    """The scale as a float32 scalar or an [out, 1] column, to divide a weight by."""
    return scale.float().reshape(()) if scale.numel() == 1 else scale.float().reshape(-1, 1)


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed: the same seed gives the same output whatever the order of the layers."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
