"""Tiny LoRA files with the real key names of every published layout, and what they must do.

    lora = write_lora(tmp_path / "l.safetensors", "flux2", "kohya")      # or "diffusers", "loha", …
    expected = lora.merged(weights, strength=0.8)                          # float64, per target weight

Factors are random and written in bfloat16; the reference is computed in float64 from the written
factors, independently of the engine, and lands on single-file tensors through the architecture's
key-layout table (checked against diffusers itself in test_models).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models.spec import Config
from tests.tiny_checkpoints import architecture

# format → (naming: "single" or "diffusers" names, prefix, kind)
FORMATS: dict[str, tuple[str, str, str]] = {
    "kohya": ("single", "lora_unet_", "lora"),
    "comfyui": ("single", "diffusion_model.", "lora"),
    "comfyui_ab": ("single", "diffusion_model.", "lora_ab"),
    "diffusers": ("diffusers", "transformer.", "lora_ab"),
    "ai-toolkit": ("diffusers", "diffusion_model.", "lora_ab"),
    "onetrainer": ("diffusers", "lora_transformer_", "lora"),
    "loha": ("single", "lora_unet_", "loha"),
    "lokr": ("single", "lora_unet_", "lokr"),
    "diff": ("single", "diffusion_model.", "diff"),
    "dora": ("single", "lora_unet_", "dora"),
}
FORMAT_LABELS = {
    "kohya": "kohya LoRA", "comfyui": "ComfyUI LoRA", "comfyui_ab": "ComfyUI LoRA",
    "diffusers": "diffusers/PEFT LoRA", "ai-toolkit": "ai-toolkit LoRA",
    "onetrainer": "kohya (OneTrainer) LoRA",
    "loha": "kohya LoHa", "lokr": "kohya LoKr", "diff": "ComfyUI full diff", "dora": "kohya LoRA with DoRA",
}  # fmt: skip


@dataclass
class Change:
    """What one LoRA does to one single-file weight: add ``delta`` (× strength), or DoRA."""

    delta: torch.Tensor  # float64, the target's full shape, at strength 1
    magnitude: torch.Tensor | None = None  # DoRA: [1, in] (per input column)


@dataclass
class TinyLora:
    path: Path
    fmt: str
    tensors: dict[str, torch.Tensor]  # as written
    changes: dict[str, Change] = field(default_factory=dict)  # single-file weight or bias name → change

    def merged(self, weights: dict[str, torch.Tensor], strength: float = 1.0) -> dict[str, torch.Tensor]:
        """``weights`` (any float dtype) with this LoRA applied: float64, for every target."""
        out = {}
        for name, change in self.changes.items():
            w = weights[name].double()
            if change.magnitude is None:
                out[name] = w + strength * change.delta
                continue
            patched = w + change.delta
            decomposed = patched * change.magnitude.double() / patched.norm(dim=0, keepdim=True)
            out[name] = w + strength * (decomposed - w)
        return out


def lora_targets(arch, config: Config, naming: str) -> dict[str, tuple[int, ...]]:
    """Every 2-D weight of the model in ``naming``'s layout: what a LoRA trained on all layers has."""
    shapes = arch.tensor_shapes(config) if naming == "single" else arch.diffusers_shapes(config)
    return {n.removesuffix(".weight"): s for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2}


def write_lora(
    path: str | Path,
    arch,
    fmt: str = "kohya",
    variant: str = "tiny",
    rank: int = 4,
    config: Config | None = None,
    only: tuple[str, ...] = (),
) -> TinyLora:
    """A LoRA in ``fmt`` on every linear layer of ``arch`` (``only``: regexes, one must match the name)."""
    arch = architecture(arch)
    config = config or arch.tiny[variant]
    naming, prefix, kind = FORMATS[fmt]
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    shapes = arch.tensor_shapes(config)
    alpha = rank / 2
    for layer, shape in lora_targets(arch, config, naming).items():
        if only and not any(re.search(o, layer) for o in only):
            continue
        stem = prefix + (layer.replace(".", "_") if prefix.endswith("_") else layer)
        written, delta = _factors(
            kind, shape, rank, alpha if fmt not in ("diffusers", "ai-toolkit") else None
        )
        tensors |= {f"{stem}.{suffix}": t for suffix, t in written.items()}
        deltas[layer] = delta
        if kind == "dora":
            magnitudes[layer] = written["dora_scale"].double()
        if kind == "diff" and f"{layer}.bias" in shapes:
            tensors[f"{stem}.diff_b"] = bias = _bf16(shape[0], std=0.01)
            bias_deltas[f"{layer}.bias"] = bias.double()
    metadata = {"format": "pt"}
    if fmt == "diffusers":  # diffusers keeps PEFT's LoraConfig in the metadata: alpha there, not in tensors
        metadata["lora_adapter_metadata"] = json.dumps(
            {"transformer.r": rank, "transformer.lora_alpha": 2 * rank}
        )
        deltas = {n: d * 2 for n, d in deltas.items()}
    path = Path(path)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata=metadata)
    lora = TinyLora(path, fmt, tensors, {n: Change(d) for n, d in bias_deltas.items()})
    for single, shape in shapes.items():
        layer = single.removesuffix(".weight")
        if naming == "single" and layer in deltas:
            lora.changes[single] = Change(deltas[layer], magnitudes.get(layer))
        elif naming == "diffusers" and len(shape) == 2 and single.endswith(".weight"):
            parts = [
                (p, deltas.get(p.name.removesuffix(".weight"))) for p in arch.diffusers_pieces(single, config)
            ]
            if any(d is not None for _, d in parts):
                rows = [range(shape[0])[p.rows] for p, _ in parts]
                lora.changes[single] = Change(
                    torch.cat(
                        [
                            torch.zeros(len(r), shape[1], dtype=torch.float64) if d is None else d[p.rows]
                            for (p, d), r in zip(parts, rows)
                        ]
                    )
                )
    return lora


def _bf16(*shape: int, std: float = 0.03) -> torch.Tensor:
    """Random factors; the default std makes deltas of a few int8 steps, as real LoRAs do."""
    return (torch.randn(shape) * std).to(torch.bfloat16)


def _factors(kind: str, shape: tuple[int, int], rank: int, alpha: float | None) -> tuple[dict, torch.Tensor]:
    """(tensors by key suffix, float64 delta at strength 1) for one layer."""
    out, inp = shape
    scale = 1.0 if alpha is None else alpha / rank
    alpha_tensor = {} if alpha is None else {"alpha": torch.tensor(alpha)}
    if kind in ("lora", "lora_ab", "dora"):
        up, down = _bf16(out, rank), _bf16(rank, inp)
        names = (
            ("lora_B.weight", "lora_A.weight")
            if kind == "lora_ab"
            else ("lora_up.weight", "lora_down.weight")
        )
        written = {names[0]: up, names[1]: down, **alpha_tensor}
        if kind == "dora":
            written["dora_scale"] = (torch.rand(1, inp) + 0.5).to(torch.bfloat16)
        return written, up.double() @ down.double() * scale
    if kind == "loha":
        w = {f"hada_{n}": _bf16(*s) for n, s in (("w1_a", (out, rank)), ("w1_b", (rank, inp)),
                                                  ("w2_a", (out, rank)), ("w2_b", (rank, inp)))}  # fmt: skip
        d = {n: t.double() for n, t in w.items()}
        return w | alpha_tensor, (d["hada_w1_a"] @ d["hada_w1_b"]) * (d["hada_w2_a"] @ d["hada_w2_b"]) * scale
    if kind == "lokr":  # w1 full [2, 4], w2 decomposed [out/2, rank] @ [rank, in/4]
        w = {
            "lokr_w1": _bf16(2, 4, std=1.0),
            "lokr_w2_a": _bf16(out // 2, rank),
            "lokr_w2_b": _bf16(rank, inp // 4),
        }
        d = {n: t.double() for n, t in w.items()}
        return w | alpha_tensor, torch.kron(d["lokr_w1"], d["lokr_w2_a"] @ d["lokr_w2_b"]) * scale
    diff = _bf16(out, inp, std=0.01)
    return {"diff": diff}, diff.double()
