"""Inspect a checkpoint: what model it holds, in which layout and weight format, and whether its
quantization markers agree with each other (what ComfyUI needs to load it).

Reads headers only, plus the few tiny ``comfy_quant`` marker tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from engine.checkpoint import CheckpointReader
from engine.jobs import JobError
from engine.models import detect

QUANT_METADATA = "_quantization_metadata"


def listed_layers(metadata: Mapping[str, str]) -> dict[str, object] | None:
    """The per-layer entries of ComfyUI's ``_quantization_metadata`` header key (``{"layers": {layer:
    entry}}``); None when the key is absent or not of that form."""
    try:
        layers = json.loads(metadata[QUANT_METADATA])["layers"]
    except (KeyError, TypeError, ValueError):
        return None
    return layers if isinstance(layers, dict) else None


@dataclass(frozen=True)
class DtypeCount:
    tensors: int
    bytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    files: list[Path]
    size: int  # bytes on disk, all files
    tensors: int
    dtypes: dict[str, DtypeCount]  # safetensors dtype → count, largest first
    metadata: dict[str, str]
    model: str | None = None  # "Flux.2 Klein 9B"; None when no supported model was recognised
    architecture: str | None = None  # "flux2"
    variant: str | None = None
    layout: str | None = None  # "single-file" | "diffusers"
    prefix: str = ""
    weight_format: str | None = None  # bf16, fp8_scaled, int8_rowwise, mixed, …
    quantized_layers: dict[str, int] = field(default_factory=dict)  # layer format → count
    markers: dict[str, int] = field(default_factory=dict)  # comfy_quant JSON → count
    metadata_layers: int | None = None  # layers listed in _quantization_metadata
    marker_mismatches: list[str] = field(default_factory=list)  # layers whose two markers disagree
    other_tensors: int = 0  # tensors outside the diffusion model (a full checkpoint's VAE, …)
    problem: str | None = None  # why no model was recognised

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=2)


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Everything ``int8-studio inspect`` shows. Raises CheckpointError for unreadable files only."""
    with CheckpointReader(path) as reader:
        dtypes: dict[str, list[int]] = {}
        for t in reader.tensors.values():
            count = dtypes.setdefault(t.dtype, [0, 0])
            count[0] += 1
            count[1] += t.nbytes
        by_size = sorted(dtypes.items(), key=lambda item: -item[1][1])
        info = CheckpointInfo(
            path=reader.path,
            files=list(reader.files),
            size=sum(f.stat().st_size for f in reader.files),
            tensors=len(reader),
            dtypes={dtype: DtypeCount(n, b) for dtype, (n, b) in by_size},
            metadata=dict(reader.metadata),
        )
        try:
            model = detect(reader)
        except JobError as e:  # not a supported model, or an incomplete one: still worth describing
            return replace(info, problem=str(e), **_markers(reader))
        formats: dict[str, int] = {}
        for fmt in model.layer_formats.values():
            formats[fmt] = formats.get(fmt, 0) + 1
        return replace(
            info,
            model=model.label,
            architecture=model.arch.name,
            variant=model.variant,
            layout=model.layout,
            prefix=model.prefix,
            weight_format=model.source_format,
            quantized_layers=formats,
            other_tensors=len(model.other_tensors),
            **_markers(reader),
        )


def _markers(reader: CheckpointReader) -> dict[str, object]:
    """The per-layer ``comfy_quant`` tensors and the header's ``_quantization_metadata``, compared."""
    tensors: dict[str, str] = {}
    for name in reader:
        if name.endswith(".comfy_quant"):
            tensors[name.removesuffix(".comfy_quant")] = reader.get_bytes(name).decode("utf-8", "replace")
    counts: dict[str, int] = {}
    for text in tensors.values():
        counts[text] = counts.get(text, 0) + 1
    layers = listed_layers(reader.metadata)
    if layers is None:
        return {"markers": counts}
    mismatches = sorted(
        layer
        for layer in set(layers) | set(tensors)
        if layer not in tensors or layer not in layers or _parsed(tensors[layer]) != layers[layer]
    )
    return {"markers": counts, "metadata_layers": len(layers), "marker_mismatches": mismatches}


def _parsed(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
