"""LoRAs applied at run time, unmerged: ``y = layer(x) + (x·downᵀ · scale)·upᵀ``.

Each adapted layer gets one :class:`LoraAdapter` holding every LoRA's factors side by side (one
column block each), so several LoRAs cost two thin matmuls per layer, not two per LoRA. ``scale``
holds strength × alpha/rank per column: :meth:`DynamicLoras.set_strength` writes it in place, so a
strength change needs no reload and no recompile (a compiled graph reads the buffer, it does not
bake its value in). Adding or removing a LoRA changes shapes: the next compiled call retraces.

``Int8Linear`` layers take the adapter as their ``lora`` and add its term inside the int8 GEMM's
epilogue (one extra thin product ``x·downᵀ`` per layer, from the int8 tokens the GEMM multiplies, so
the layer's input stays fused; no [M, N] temporary); float ``nn.Linear`` layers (those kept in high
precision) through a forward hook. Split q/k/v LoRAs land on the fused weight's
rows by zero rows in ``up``. Only plain low-rank layers can run unmerged: LoHa, LoKr, full diffs,
DoRA and bias diffs change the weight in ways two thin matmuls cannot express, and are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from engine.int8.linear import Int8Linear
from engine.lora.delta import factor
from engine.lora.files import LoraError, check_strength
from engine.lora.mapping import LoraMatch


@dataclass(frozen=True)
class Factors:
    """One LoRA's factors for one layer: ``down`` [r, in], ``up`` [out, r], ``unit`` [r] (alpha/rank)."""

    down: torch.Tensor
    up: torch.Tensor
    unit: torch.Tensor


class LoraAdapter(nn.Module):
    """Several LoRAs on one layer: ``(x·downᵀ · scale)·upᵀ``, each LoRA a block of columns."""

    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        # not persistent: the model's state dict stays the checkpoint's
        self.register_buffer(
            "down", torch.empty(0, in_features, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer("up", torch.empty(out_features, 0, device=device, dtype=dtype), persistent=False)
        self.register_buffer("scale", torch.empty(0, device=device), persistent=False)
        self.blocks: dict[
            str, tuple[slice, torch.Tensor]
        ] = {}  # LoRA name → (columns, alpha/rank per column)

    def append(self, name: str, factors: Factors, strength: float) -> None:
        start = self.down.shape[0]
        columns = slice(start, start + factors.down.shape[0])
        self.down = torch.cat([self.down, factors.down.to(self.down)])
        self.up = torch.cat([self.up, factors.up.to(self.up)], dim=1)
        unit = factors.unit.to(self.scale)
        self.scale = torch.cat([self.scale, unit * strength])
        self.blocks[name] = (columns, unit)

    def set_strength(self, name: str, strength: float) -> None:
        columns, unit = self.blocks[name]
        self.scale[columns] = unit * strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down.T * self.scale.to(x.dtype)) @ self.up.T

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}, loras={list(self.blocks)}"


def layer_factors(
    match: LoraMatch,
    lora,
    out_features: Callable[[str], int],
    merged_instead: str = "merge it into the model instead",
) -> dict[str, Factors]:
    """Each adapted layer's factors (module name → :class:`Factors`, float32 on the CPU) of ``match``,
    the tensors read from ``lora`` (a ``LoraFile``, or anything with its ``name`` and ``get(key)``).
    Split q/k/v land on their rows of a fused weight (``out_features(layer)`` rows) through zero rows
    in ``up``. Only plain low-rank layers run unmerged: others are a :class:`LoraError` that ends with
    ``merged_instead``, what to do instead."""
    by_layer: dict[str, list] = {}
    for patch in match.patches:
        if patch.part != "weight" or patch.layer.kind != "lora" or patch.layer.dora:
            layer = patch.layer
            raise LoraError(
                f"{lora.name} has {layer.label} layers ('{layer.stem}'), which only work merged: {merged_instead}"
            )
        by_layer.setdefault(patch.target.removesuffix(".weight"), []).append(patch)
    cpu = torch.device("cpu")
    factors = {}
    for layer, patches in by_layer.items():
        downs, ups, units = [], [], []
        for patch in patches:
            down = factor(lora, patch.layer, "down", cpu)
            up_rows = factor(lora, patch.layer, "up", cpu)
            up = up_rows.new_zeros(out_features(layer), down.shape[0])  # zero rows: what it does not adapt
            for s in patch.segments:
                up[s.dst : s.dst + s.length] = up_rows[s.src : s.src + s.length]
            downs.append(down)
            ups.append(up)
            units.append(torch.full((down.shape[0],), patch.layer.scale))
        factors[layer] = Factors(torch.cat(downs), torch.cat(ups, dim=1), torch.cat(units))
    return factors


def _add_adapter(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output + module.lora_adapter(inputs[0])


class DynamicLoras:
    """The unmerged LoRAs of one model (built with single-file module names, as ``engine.models`` does).

    ``dtype`` is the dtype the model computes in (the factors are stored in it).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model = model
        self.dtype = dtype
        self.adapters: dict[str, LoraAdapter] = {}
        self.strengths: dict[str, float] = {}

    def add(self, match: LoraMatch, strength: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA matched onto this model (``match_model``); returns the name it goes by."""
        factors = layer_factors(match, match.lora, lambda layer: self._layer(layer).weight.shape[0])
        return self.add_factors(name or match.lora.name, factors, strength)

    def add_factors(self, name: str, factors: Mapping[str, Factors], strength: float = 1.0) -> str:
        """Add a LoRA given as factors per layer (module name → :class:`Factors`)."""
        base, n = name, 1
        strength = check_strength(strength, name)
        while name in self.strengths:
            n += 1
            name = f"{base} #{n}"
        for layer, f in factors.items():
            self._adapter(layer).append(name, f, strength)
        self.strengths[name] = strength
        return name

    def set_strength(self, name: str, strength: float) -> None:
        """Change a LoRA's strength in place: no reload, no recompile."""
        if name not in self.strengths:
            raise LoraError(
                f"no LoRA named {name!r} is applied; applied: {', '.join(self.strengths) or 'none'}"
            )
        strength = check_strength(strength, name)
        for adapter in self.adapters.values():
            if name in adapter.blocks:
                adapter.set_strength(name, strength)
        self.strengths[name] = strength

    def _layer(self, name: str) -> nn.Module:
        module = self.model.get_submodule(name)
        if not isinstance(module, (Int8Linear, nn.Linear)):
            raise LoraError(
                f"'{name}' is a {type(module).__name__}, not a linear layer: the LoRA cannot run unmerged"
            )
        return module

    def _adapter(self, name: str) -> LoraAdapter:
        if name not in self.adapters:
            module = self._layer(name)
            out, inp = module.weight.shape
            adapter = LoraAdapter(inp, out, module.weight.device, self.dtype)
            if isinstance(module, Int8Linear):
                module.lora = adapter
            else:
                module.lora_adapter = adapter
                module.register_forward_hook(_add_adapter)
            self.adapters[name] = adapter
        return self.adapters[name]
