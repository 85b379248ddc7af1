"""Merging a stack of LoRAs into a model's weights, and the job that writes the merged model.

Each weight is patched in float32 (on the GPU when there is one) by every LoRA in turn and rounded
once. int8 weights are merged in one of two modes:

- ``requant``: dequantize, patch, quantize again with fresh scales of the same scheme (tensor-wise
  or row-wise). Every value is rounded to nearest on the new grid.
- ``stochastic``: keep the existing scale and add the change in the int8 grid with stochastic
  rounding (``floor(Δ/scale + u)``, u uniform, seeded per layer so the output is reproducible):
  unbiased, so small changes survive on average instead of rounding away; untouched values stay
  bit-identical. Values pushed past ±127 are clamped and counted.

Float weights (bf16, fp16, fp32 layers, and fp8 layers, which the plan dequantizes to bf16) get the
patched float32 weight rounded to their dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.int8.quantize import QMAX, dequantize_weight, quantize_weight
from engine.lora.delta import apply_
from engine.lora.files import LoraFile
from engine.lora.mapping import Patch

Mode = Literal["requant", "stochastic"]
MODES: tuple[Mode, ...] = ("requant", "stochastic")

Applied = tuple[LoraFile, Patch, float]  # a patch, the file it reads from, its strength


@dataclass
class MergeStats:
    """How far the int8 result is from the float merge, summed over int8 weights."""

    layers: int = 0
    clipped: int = 0  # stochastic mode: values clamped at ±127
    error_sq: float = 0.0  # Σ (merged int8 dequantized − float merge)²
    change_sq: float = 0.0  # Σ (float merge − original)²
    per_layer: dict[str, float] = field(default_factory=dict)  # rms error / rms change

    @property
    def relative_error(self) -> float:
        """rms error against the float merge, as a fraction of the rms change the LoRAs make."""
        return math.sqrt(self.error_sq / self.change_sq) if self.change_sq else 0.0


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 weight, scale)`` with the patches applied; the scale keeps its shape ([], [out, 1], …)."""
    q, scale = q.to(device), scale.to(device)
    original = dequantize_weight(q, scale)
    merged = patch_(original.clone(), applied)
    if mode == "requant":
        scheme = "tensorwise" if scale.numel() == 1 else "rowwise"
        new_q, new_scale = (t.to(device) for t in quantize_weight(merged, scheme, device))
        new_scale = new_scale.reshape(scale.shape)
    else:
        generator = torch.Generator(device).manual_seed(_layer_seed(seed, name))
        new_q, clipped = _stochastic_round(q, scale, merged - original, generator)
        new_scale = scale
        stats.clipped += clipped
    error = dequantize_weight(new_q, new_scale).sub_(merged)
    error_sq, change_sq = float(error.square().sum()), float(merged.sub_(original).square().sum())
    stats.layers += 1
    stats.error_sq += error_sq
    stats.change_sq += change_sq
    stats.per_layer[name] = math.sqrt(error_sq / change_sq) if change_sq else 0.0
    return new_q.cpu(), new_scale.cpu()


def _stochastic_round(
    q: torch.Tensor, scale: torch.Tensor, change: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """``q + floor(change / scale + u)`` clamped to ±127 (u uniform in [0, 1): unbiased rounding, and a
    zero change leaves ``q`` exactly), and how many values were clamped. ``change`` is consumed."""
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
