"""What a LoRA file is: format, rank, the model it is for, and how much of it maps onto that model.

Without a model, the target is the architecture (and released variant) the LoRA's names and shapes
fit best; with one, coverage is measured on that model and a LoRA for another one is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint import CheckpointReader
from engine.lora.files import LoraFile
from engine.lora.mapping import ModelNames, fits, guess_target, match, match_model, variant_names
from engine.models import detect


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    size: int  # bytes
    tensors: int
    layers: int  # adapted layers the file holds
    format: str  # "kohya LoRA", "diffusers/PEFT LoRA with DoRA", …
    ranks: tuple[int, ...]
    scales: tuple[float, ...]  # alpha / rank (what multiplies up·down), distinct values
    target: str | None  # "Flux.2 Klein 9B" (the model given, or the best guess); None: no known model
    fits: bool  # the matched layers have the target's shapes
    target_layers: int  # of the target's linear weights, how many the LoRA adapts
    target_linears: int
    matched_keys: int
    unmatched: tuple[str, ...]  # keys that found no layer of the target
    text_encoder: int  # keys for a text encoder (not part of the diffusion model)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str, indent=2)


def inspect_lora(path: str | Path, model: str | Path | None = None) -> LoraInfo:
    """Read ``path``'s headers (and alphas) and map it onto ``model``, or onto its best guess."""
    path = Path(path)
    with LoraFile(path) as lora:
        if model is not None:
            with CheckpointReader(model) as reader:
                detected = detect(reader)
            names, target = ModelNames.of(detected), detected.label
            found = match_model(lora, detected)
        else:
            guess = guess_target(lora)
            names = variant_names(guess) if guess else None
            found = match(lora, names) if names else None
            target = str(guess) if guess else None
        linears = (
            [n for n, s in names.shapes.items() if len(s) == 2 and n.endswith(".weight")] if names else []
        )
        layers = lora.layers.values()
        return LoraInfo(
            path=path,
            size=path.stat().st_size,
            tensors=len(lora.reader.tensors),
            layers=len(lora.layers),
            format=found.format if found and found.patches else lora.kinds,
            ranks=lora.ranks,
            scales=tuple(sorted({layer.scale for layer in layers if layer.rank})),
            target=target,
            fits=bool(found and found.patches) and all(fits(p, names.shapes) for p in found.patches),
            target_layers=len({p.target for p in found.patches if p.part == "weight"}) if found else 0,
            target_linears=len(linears),
            matched_keys=found.matched_keys if found else 0,
            unmatched=found.unmatched if found else tuple(k for layer in layers for k in layer.keys.values()),
            text_encoder=len(found.text_encoder) if found else 0,
        )
