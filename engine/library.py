"""The model library: the diffusion models and LoRAs in a set of folders, described from headers only.

Each ``.safetensors`` file is opened just far enough to read its header (plus, for an int8 model
whose header does not say whether it is rotated, one ``comfy_quant`` marker of a few bytes), so a
folder of hundreds of multi-gigabyte files is listed in about a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from engine.checkpoint import CheckpointError, TensorInfo, read_header
from engine.comfyui import MODEL_EXTENSIONS, ComfyInstall
from engine.info import listed_layers
from engine.int8.rotation import RotationError, parse_marker
from engine.jobs import CancelToken, JobError, ProgressFn, Reporter, os_error_message
from engine.lora.files import KIND_LABELS, SUFFIXES
from engine.models import detect_tensors

LIBRARY_KINDS = ("diffusion_models", "checkpoints", "loras")
"""The ComfyUI folder kinds a library scan covers."""
MODEL_KINDS = ("diffusion model", "checkpoint")
"""The entry kinds that are models (a checkpoint also holds a text encoder or VAE)."""

SCHEME_LABELS = {"tensorwise": "tensor-wise", "rowwise": "row-wise"}
"""The int8 weight scales in words, as the library and the app write them."""
FORMAT_LABELS = {"fp8_scaled": "fp8 scaled", **{f"int8_{s}": f"int8 {label}" for s, label in SCHEME_LABELS.items()}}
DTYPE_LABELS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}
LORA_FACTORS = {suffix: kind for suffix, (kind, _) in SUFFIXES.items() if kind in KIND_LABELS}
LORA_FACTOR_RE = re.compile(r"\.(" + "|".join(map(re.escape, LORA_FACTORS)) + r")$")
LORA_DOWN = ("lora_down.weight", "lora_A.weight")  # its rows are the rank
BASE_MODEL_KEYS = ("modelspec.architecture", "ss_base_model_version")  # what trainers record


@dataclass(frozen=True)
class LibraryEntry:
    path: Path
    kind: str  # "diffusion model", "checkpoint" (model with text encoder/VAE), "LoRA", "other", "unreadable"
    size: int  # bytes
    modified: float  # POSIX time of the last change
    model: str = ""  # "Flux.2 Klein 9B"; for a LoRA the base model its trainer recorded, if any
    architecture: str = ""  # "flux2"
    format: str = ""  # "bf16", "fp8 scaled", "int8 row-wise", "int8 tensor-wise rotated", "LoRA rank 8, bf16"
    note: str = ""  # why a file is "other" or "unreadable"


@dataclass(frozen=True)
class LibraryRequest:
    folders: tuple[Path, ...]
    files: tuple[Path, ...] = ()  # single files listed too (recent, dropped); those not there are skipped


@dataclass(frozen=True)
class LibraryResult:
    entries: list[LibraryEntry]  # sorted by folder, then name; then the single files no folder lists
    missing: list[Path]  # requested folders that do not exist


def comfyui_folders(installs: Iterable[ComfyInstall]) -> list[Path]:
    """The existing folders ComfyUI lists diffusion models, checkpoints and LoRAs from."""
    folders: list[Path] = []
    for install in installs:
        for kind in LIBRARY_KINDS:
            for folder in install.folders.get(kind, []):
                if folder.path.is_dir() and folder.path not in folders:
                    folders.append(folder.path)
    return folders


def run_library_scan(
    request: LibraryRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> LibraryResult:
    cancel = cancel or CancelToken()
    missing = [Path(f) for f in request.folders if not Path(f).is_dir()]
    files = _model_files([Path(f) for f in request.folders if Path(f).is_dir()], cancel)
    files += [f for f in dict.fromkeys(map(Path, request.files)) if f.is_file() and f not in files]
    report = Reporter(progress, "library", len(files))
    entries = []
    for done, path in enumerate(files, 1):
        cancel.check()
        try:
            entries.append(describe_file(path))
        except OSError as e:  # gone or unreadable since the folder was listed: one row says so
            entries.append(LibraryEntry(path, "unreadable", 0, 0.0, note=os_error_message(e)))
        report(done, path.name)
    return LibraryResult(entries, missing)


def _model_files(folders: list[Path], cancel: CancelToken) -> list[Path]:
    """Every model file under ``folders``, recursively as ComfyUI lists them, following links but
    listing each real file once (by its own path where a link also leads to it), and leaving out
    hidden files and folders (partial downloads and exports)."""
    seen_dirs: set[str] = set()
    files: dict[str, Path] = {}  # real path → the path we list
    for folder in folders:
        for top, dirs, names in os.walk(folder, followlinks=True):
            cancel.check()
            real = os.path.realpath(top)
            if real in seen_dirs:  # a link back up the tree, or a folder reached twice
                dirs.clear()
                continue
            seen_dirs.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                path = Path(top) / name
                if name.startswith(".") or not name.lower().endswith(MODEL_EXTENSIONS) or not path.is_file():
                    continue
                real_file = os.path.realpath(path)
                known = files.get(real_file)
                if known is None or (str(known) != real_file and str(path) == real_file):
                    files[real_file] = path
    return list(files.values())


_described: dict[tuple[Path, int, int], LibraryEntry] = {}
"""Rows already made in this process, by (path, size, modification time): rescans are instant."""


def describe_file(path: Path) -> LibraryEntry:
    """One library row, from the file's header."""
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _described:
        _described[key] = _describe(path, LibraryEntry(path, "unreadable", stat.st_size, stat.st_mtime))
    return _described[key]


def export_kind(path: Path) -> str:
    """The ComfyUI folder a file is exported to by default: ``loras`` for a LoRA, else
    ``diffusion_models`` (also for a file that cannot be read: the export then says why)."""
    try:
        return "loras" if describe_file(Path(path)).kind == "LoRA" else "diffusion_models"
    except OSError:
        return "diffusion_models"


def _describe(path: Path, entry: LibraryEntry) -> LibraryEntry:
    try:
        tensors, metadata = read_header(path)
    except CheckpointError as e:
        return replace(entry, note=str(e))
    factors = {name: LORA_FACTORS[m[1]] for name in tensors if (m := LORA_FACTOR_RE.search(name))}
    if factors:
        return replace(entry, kind="LoRA", model=_base_model(metadata), format=_lora_format(tensors, factors))
    try:
        model = detect_tensors(tensors)
    except JobError as e:
        return replace(entry, kind="other", note=str(e))
    fmt = FORMAT_LABELS.get(model.source_format, model.source_format)
    if model.source_format.startswith("int8") and _rotated(path, tensors, metadata):
        fmt += " rotated"
    return replace(
        entry,
        kind="checkpoint" if model.other_tensors else "diffusion model",
        model=model.label,
        architecture=model.arch.name,
        format=fmt,
    )


def _lora_format(tensors: dict[str, TensorInfo], factors: dict[str, str]) -> str:
    """"LoRA rank 16, bf16", "LoKr, fp32", "LoRA rank 4–32, fp16"."""
    kinds = sorted({KIND_LABELS[k] for k in factors.values()})
    ranks = sorted({tensors[n].shape[0] for n in factors if n.endswith(LORA_DOWN) and tensors[n].shape})
    rank = "" if not ranks else f" rank {ranks[0]}" if len(ranks) == 1 else f" rank {ranks[0]}–{ranks[-1]}"
    dtypes = sorted({DTYPE_LABELS.get(tensors[n].dtype, tensors[n].dtype.lower()) for n in factors})
    return f"{', '.join(kinds)}{rank}, {'/'.join(dtypes)}"


def _base_model(metadata: dict[str, str]) -> str:
    return next((metadata[k] for k in BASE_MODEL_KEYS if metadata.get(k)), "")


def _rotated(path: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str]) -> bool:
    """Whether the int8 layers are Hadamard-rotated ("convrot" in their format marker).

    The header's ``_quantization_metadata`` says so for every layer; without it, the first
    ``comfy_quant`` marker (a few bytes) is read.
    """
    layers = listed_layers(metadata)
    if layers is not None:
        return any(isinstance(v, dict) and v.get("convrot") for v in layers.values())
    marker = next((t for n, t in tensors.items() if n.endswith(".comfy_quant")), None)
    if marker is None:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(marker.offset)
            entry = parse_marker(f.read(marker.nbytes), marker.name)
    except (OSError, RotationError):
        return False
    return bool(entry.get("convrot"))
