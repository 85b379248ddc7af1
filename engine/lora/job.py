"""The LoRA merge job: a model plus LoRAs in, a model of the same format out, tensor by tensor.

The output has the model's single-file layout (the same plan conversion uses, so any readable model
works: int8, bf16, fp8 — dequantized to bf16 — or diffusers), every tensor in its original dtype
and scale shape, and metadata listing the LoRAs merged with their strengths. Only the model's
largest weight and its float32 temporaries are in memory at any time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import CheckpointReader, check_memory
from engine.checkpoint_writer import CheckpointWriter
from engine.convert import METADATA_PREFIX, finite, named_beside, working_bytes
from engine.int8.apply import layer_rotations
from engine.int8.quantize import default_device
from engine.jobs import CancelToken, ProgressFn, Reporter, display_name
from engine.lora.files import LoraError, LoraFile, check_strength
from engine.lora.mapping import LoraMatch, match_model
from engine.lora.merge import MODES, Applied, MergeStats, Mode, merge_float, merge_int8
from engine.models import DetectedModel, OutputTensor, detect

LORAS_METADATA = METADATA_PREFIX + "loras"  # JSON list of {"name", "strength"}, oldest merge first
WARN_KEPT = 0.5  # below this fraction of the LoRAs' change kept, the result carries a warning


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    strength: float = 1.0


@dataclass(frozen=True)
class LoraMergeRequest:
    model: Path
    loras: tuple[LoraSpec, ...]
    output: Path | None = None  # default: <model>-<lora>[-<lora>…].safetensors beside the model
    mode: Mode = "auto"
    seed: int = 0  # stochastic rounding: the same seed gives the same file
    overwrite: bool = False


@dataclass(frozen=True)
class LoraMergeResult:
    output: Path
    model: str  # "Flux.2 Klein 9B"
    matches: tuple[LoraMatch, ...]  # one per LoRA, in request order
    tensors_changed: int
    stats: MergeStats  # int8 weights: error against the float merge, change kept, values clipped

    @property
    def warnings(self) -> list[str]:
        """What a user must know about the result: that the int8 rounding lost most of the LoRAs'
        change (the merge then looks done but the model behaves as before)."""
        s = self.stats
        if not s.layers or s.kept >= WARN_KEPT:
            return []
        lost = f"{1 - max(s.kept, 0.0):.0%} of the LoRAs' change"
        if not s.modes["stochastic"]:
            why = "it is smaller than half an int8 step in most layers"
            return [f"requant rounded away {lost} ({why}); use auto or stochastic to keep it"]
        clipped = (
            f": {s.clipped} values were clipped at ±127, the existing scales are too small for the "
            "change; use auto or requant, which choose fresh scales"
        )
        return [f"the int8 rounding lost {lost}{clipped if s.clipped else ''}"]


def run_lora_merge(
    request: LoraMergeRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> LoraMergeResult:
    """Merge ``request.loras`` into ``request.model`` and write ``request.output``."""
    _check(request)
    cancel = cancel or CancelToken()
    device = default_device()
    with CheckpointReader(request.model) as reader, ExitStack() as opened:
        model = detect(reader)
        output = _check_output(request.output or default_output(model, reader, request.loras), request)
        loras = [opened.enter_context(LoraFile(spec.path)) for spec in request.loras]
        matches = tuple(match_model(lora, model) for lora in loras)
        applied: dict[str, list[Applied]] = {}
        for spec, m in zip(request.loras, matches):
            for patch in m.patches:
                applied.setdefault(patch.target, []).append((m.lora, patch, spec.strength))
        scales = _int8_scales(model)
        plan = _scales_after_weights(model.tensors, scales)
        by_name = {t.name: t for t in plan}

        def build(name: str) -> torch.Tensor:
            t = by_name[name]
            # the sources, the tensor, and for a merge float32 copies: the weight, the change, the result
            merging = 4 * 4 * (t.nbytes // t.dtype.itemsize) if name in applied else 0
            check_memory(f"tensor '{model.prefix}{name}'", working_bytes(reader, t, False) + merging)
            tensor = t.build([reader.get(s) for s in t.sources])
            if not finite(tensor):
                raise LoraError(
                    f"{reader.path.name}: tensor '{model.prefix}{name}' has NaN or Inf values (the file is "
                    "corrupt); download or export it again"
                )
            return tensor

        rotations = layer_rotations(reader, model)
        stats = MergeStats()
        pending: dict[str, torch.Tensor] = {}  # new scales of int8 weights, written right after them
        report = Reporter(progress, "merge", len(plan))
        layout = {t.name: (t.dtype, t.shape) for t in plan}
        metadata = _metadata(reader.metadata, request)
        with CheckpointWriter(output, layout, metadata, overwrite=request.overwrite) as writer:
            for done, t in enumerate(plan):
                cancel.check()
                tensor = pending.pop(t.name) if t.name in pending else build(t.name)
                if t.name in applied and t.name in scales:
                    tensor, pending[scales[t.name]] = merge_int8(
                        t.name, tensor, build(scales[t.name]), applied[t.name], request.mode, request.seed,
                        stats, device, rotations.get(t.name.removesuffix(".weight"), 0),
                    )  # fmt: skip
                elif t.name in applied:
                    tensor = merge_float(tensor, applied[t.name], device)
                writer.write(t.name, tensor)
                report(done + 1, t.name)
            output = writer.commit()
    return LoraMergeResult(output, model.label, matches, len(applied), stats)


def _check(request: LoraMergeRequest) -> None:
    if not request.loras:
        raise LoraError("no LoRA to merge: give at least one LoRA file")
    if request.mode not in MODES:
        raise LoraError(f"unknown merge mode {request.mode!r}; use {', '.join(MODES)}")
    for spec in request.loras:
        check_strength(spec.strength, spec.path.name)


def default_output(model: DetectedModel, reader: CheckpointReader, loras: tuple[LoraSpec, ...]) -> Path:
    """``<model>-<lora>[-<lora>…].safetensors`` beside the model, named as ``convert`` names its output."""
    return named_beside(model, reader, "".join(f"-{s.path.name.removesuffix('.safetensors')}" for s in loras))


def _check_output(output: Path, request: LoraMergeRequest) -> Path:
    if Path(output).resolve() == Path(request.model).resolve():
        raise LoraError(f"the output {output} is the model itself; write the merged model to a new file")
    return Path(output)


def _int8_scales(model: DetectedModel) -> dict[str, str]:
    """int8 weight name → its scale's name."""
    return {f"{layer}.weight": f"{layer}.weight_scale" for layer in model.int8_layers}


def _scales_after_weights(plan: list[OutputTensor], scales: Mapping[str, str]) -> list[OutputTensor]:
    """The plan with each int8 weight's scale right after it: requant makes both at once."""
    by_name = {t.name: t for t in plan}
    moved = set(scales.values())
    ordered = []
    for t in plan:
        if t.name not in moved:
            ordered.append(t)
        if t.name in scales:
            ordered.append(by_name[scales[t.name]])
    return ordered


def _metadata(source: Mapping[str, str], request: LoraMergeRequest) -> dict[str, str]:
    """The model's metadata, less hashes of its bytes (they no longer hold), with this merge's LoRAs
    appended to the list of merged LoRAs. Our own keys (the conversion's source hash included) stay:
    they describe where the weights came from."""
    try:
        merged = json.loads(source.get(LORAS_METADATA, "[]"))
    except ValueError:
        merged = None
    if not isinstance(merged, list):  # not ours: a list of what we merged is all the key may hold
        merged = []
    merged += [{"name": display_name(spec.path.name), "strength": spec.strength} for spec in request.loras]
    kept = {k: v for k, v in source.items() if k.startswith(METADATA_PREFIX) or not _is_hash(k)}
    return {**kept, LORAS_METADATA: json.dumps(merged)}


def _is_hash(key: str) -> bool:
    return "hash" in key.lower() or "sha256" in key.lower()
