"""The change a LoRA layer makes to a weight, in float32.

``apply_(weight, …)`` patches float32 rows in place; a stack of LoRAs is applied one after another
to the same float32 weight and rounded once at the end (:mod:`engine.lora.merge`). Plain deltas are
``strength × scale × product``; DoRA rescales the patched weight's norms (per output row when the
magnitude has one value per row, per input column when it has shape ``[1, in]``), computed on the
weight as patched, as PEFT and LyCORIS do, and then blends by strength.
"""

from __future__ import annotations

import torch

from engine.lora.files import LoraError, LoraFile, LoraLayer


def factor(lora: LoraFile, layer: LoraLayer, role: str, device: torch.device) -> torch.Tensor:
    """One of the layer's tensors as float32 on ``device`` (1×1 convolution factors as matrices)."""
    t = lora.get(layer.keys[role]).to(device=device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise LoraError(f"{lora.name}: '{layer.keys[role]}' has NaN or Inf values: the file is corrupt")
    return t.reshape(t.shape[0], -1) if t.ndim == 4 else t


def product(lora: LoraFile, layer: LoraLayer, device: torch.device) -> torch.Tensor:
    """``scale × (the factors' product)``: the layer's weight delta at strength 1, float32 [out, in]."""

    def f(role: str) -> torch.Tensor:
        return factor(lora, layer, role, device)

    if layer.kind == "lora":
        delta = f("up") @ f("down")
    elif layer.kind == "loha":
        delta = (f("w1_a") @ f("w1_b")) * (f("w2_a") @ f("w2_b"))
    elif layer.kind == "lokr":
        w1, w2 = (f(w) if w in layer.keys else f(f"{w}_a") @ f(f"{w}_b") for w in ("w1", "w2"))
        delta = torch.kron(w1, w2)
    else:
        delta = f("diff")
    return delta.mul_(layer.scale)


def apply_(
    weight: torch.Tensor, lora: LoraFile, layer: LoraLayer, part: str, strength: float
) -> torch.Tensor:
    """Apply the layer at ``strength`` to ``weight`` (float32: the rows it patches), in place."""
    if part == "bias":
        return weight.add_(factor(lora, layer, "bias", weight.device), alpha=strength)
    delta = product(lora, layer, weight.device)
    if layer.dora is None:
        return weight.add_(delta, alpha=strength)
    magnitude = factor(lora, layer, "dora", weight.device)
    patched = delta.add_(weight)
    if magnitude.shape == (1, weight.shape[1]):
        norm = patched.norm(dim=0, keepdim=True)
    else:
        norm, magnitude = patched.norm(dim=1, keepdim=True), magnitude.reshape(-1, 1)
    decomposed = patched.mul_(magnitude / norm.clamp_min(torch.finfo(torch.float32).eps))
    return weight.lerp_(decomposed, strength)
