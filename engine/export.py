"""Exporting a file into a ComfyUI models folder (see :mod:`engine.comfyui` for finding them) the safe way:
free space checked first, hard link or copy to a temporary name beside the target, the result verified
(it must load as what it claims to be), then renamed into place. Nothing is overwritten unless asked,
and a failure leaves nothing.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint import CheckpointReader, format_bytes
from engine.comfyui import MODEL_EXTENSIONS
from engine.info import QUANT_METADATA, listed_layers
from engine.int8.rotation import RotationError, check_group, marker_group, parse_marker
from engine.jobs import (
    TEMPORARY_FILES,
    CancelToken,
    JobError,
    OutputExistsError,
    ProgressFn,
    Reporter,
    check_name,
    temporary_name,
)
from engine.lora.files import LoraFile
from engine.models import detect

EXPORT_KINDS = ("diffusion_models", "loras")
FREE_SPACE_RESERVE = 100_000_000  # never fill a disk to the last byte
COPY_CHUNK = 16 << 20
INT8_FORMAT_PREFIX = "int8"


class ExportError(JobError):
    """An export that cannot be done or whose result failed verification; nothing was left behind."""


# --- verification -------------------------------------------------------------------------------


def check_int8_layers(reader: CheckpointReader) -> tuple[int, int]:
    """Check what ComfyUI's INT8 loaders need of every int8 weight; return the number of int8 layers
    and how many of them are Hadamard-rotated.

    Each ``L.weight`` of dtype int8 needs a float32 ``L.weight_scale`` of shape ``[]``, ``[1]``,
    ``[out]`` or ``[out, 1]``, and an int8 format marker: the ``L.comfy_quant`` tensor, or its entry
    in the header's ``_quantization_metadata`` (ComfyUI turns one into the other); where both exist
    they must agree, and the metadata may name no layer the file lacks. A rotated layer's group size
    must be a power of 4 that divides its input width.
    """
    listed = _listed_layers(reader)
    count = rotated = 0
    for name, info in reader.tensors.items():
        if info.dtype != "I8" or not name.endswith(".weight"):
            continue
        layer = name.removesuffix(".weight")
        scale = reader.tensors.get(f"{layer}.weight_scale")
        if scale is None:
            raise ExportError(f"int8 weight '{name}' has no '{layer}.weight_scale': the file is incomplete")
        rows = info.shape[0] if info.shape else 1
        if scale.dtype != "F32" or scale.shape not in ((), (1,), (rows,), (rows, 1)):
            raise ExportError(
                f"'{layer}.weight_scale' is {scale.dtype} {list(scale.shape)}; ComfyUI needs F32 of shape "
                f"[], [1], [{rows}] or [{rows}, 1]"
            )
        marker = _comfy_quant(reader, layer)
        entry = listed.get(layer)
        if marker is None and entry is None:
            raise ExportError(
                f"int8 layer '{layer}' has neither a comfy_quant marker nor a {QUANT_METADATA} entry: "
                "ComfyUI would not load it as int8"
            )
        if marker is not None and entry is not None and marker != entry:
            raise ExportError(
                f"int8 layer '{layer}': its comfy_quant marker {marker} disagrees with "
                f"{QUANT_METADATA} {entry}"
            )
        fmt = str((marker or entry).get("format", ""))
        if not fmt.startswith(INT8_FORMAT_PREFIX):
            raise ExportError(f"int8 layer '{layer}' is marked with format '{fmt}', not an int8 format")
        try:
            if group := marker_group(marker or entry):
                check_group(group, info.shape[-1])
        except RotationError as e:
            raise ExportError(f"int8 layer '{layer}' is marked rotated, but {e}") from None
        count += 1
        rotated += bool(group)
    for layer in listed:
        if f"{layer}.weight" not in reader:
            raise ExportError(f"{QUANT_METADATA} lists layer '{layer}', which the file does not have")
    return count, rotated


def _listed_layers(reader: CheckpointReader) -> dict[str, dict]:
    """The header's per-layer entries; {} without the key, an error when it is malformed."""
    if QUANT_METADATA not in reader.metadata:
        return {}
    layers = listed_layers(reader.metadata)
    if layers is None or not all(isinstance(v, dict) for v in layers.values()):
        form = '{"layers": {layer: {...}}}'
        raise ExportError(f"the header's {QUANT_METADATA} is not JSON of the form {form}")
    return layers


def _comfy_quant(reader: CheckpointReader, layer: str) -> dict | None:
    name = f"{layer}.comfy_quant"
    info = reader.tensors.get(name)
    if info is None:
        return None
    try:
        if info.dtype != "U8" or len(info.shape) != 1:
            raise RotationError(name)
        return parse_marker(reader.get(name), name)
    except RotationError:
        raise ExportError(f"'{name}' is not the UTF-8 bytes of a JSON object") from None


def verify_export(path: Path, kind: str) -> str:
    """Open ``path`` the way ComfyUI will use it and return what it holds ("Flux.2 Klein 9B, int8_rowwise").

    A diffusion model must be a recognised architecture whose int8 layers satisfy
    :func:`check_int8_layers`; a LoRA must read as a LoRA. Raises ExportError (or the reader's error).
    """
    if kind == "loras":
        with LoraFile(path) as lora:
            return f"{lora.kinds}, {len(lora.layers)} layers"
    with CheckpointReader(path) as reader:
        int8_layers, rotated = check_int8_layers(reader)
        model = detect(reader)
    what = f"{model.label}, {model.source_format}"
    if rotated:
        needs = "needs a ComfyUI that reads 'convrot'"
        return f"{what} ({int8_layers} int8 layers, {rotated} Hadamard-rotated: {needs})"
    return f"{what} ({int8_layers} int8 layers)" if int8_layers else what


# --- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportRequest:
    source: Path
    folder: Path  # the models folder, usually ComfyInstall.export_folder(kind)
    kind: str = "diffusion_models"  # "diffusion_models" | "loras": what the file is checked to be
    name: str | None = None  # file name in the folder; default: the source's
    overwrite: bool = False  # replace a file of that name (never the source itself)
    link: bool = True  # hard-link instead of copying when source and folder share a filesystem


@dataclass(frozen=True)
class ExportResult:
    path: Path
    description: str  # what verification found: "Flux.2 Klein 9B, int8_rowwise (84 int8 layers)"
    size: int
    linked: bool  # a hard link to the source rather than a copy
    already_there: bool = False  # the target already was the source file: nothing was done

    @property
    def summary(self) -> str:
        """``"exported PATH (hard link, 9.2 GB): Flux.2 Klein 9B, int8_rowwise (…)"``."""
        how = "already there" if self.already_there else "hard link" if self.linked else "copy"
        return f"exported {self.path} ({how}, {format_bytes(self.size)}): {self.description}"


def run_export(
    request: ExportRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> ExportResult:
    if request.kind not in EXPORT_KINDS:
        raise ExportError(f"cannot export as '{request.kind}'; choose one of: {', '.join(EXPORT_KINDS)}")
    if Path(request.source).is_dir():
        raise ExportError(
            f"{request.source} is a folder; export a single .safetensors file (convert a diffusers model "
            "first)"
        )
    name = request.name or Path(request.source).name
    if Path(name).name != name or not name.lower().endswith(MODEL_EXTENSIONS):
        raise ExportError(f"'{name}' is not a file name ending in .safetensors; choose another name")
    check_name(Path(name))
    description = verify_export(Path(request.source), request.kind)  # fail before writing anything
    source = Path(request.source).resolve()  # a hub cache entry is a link into its blobs/: export the file
    target, size = Path(request.folder) / name, source.stat().st_size
    if target.exists() and os.path.samefile(source, target):
        return ExportResult(target, description, size, linked=False, already_there=True)
    _refuse_to_overwrite(target, request.overwrite)
    _make_folder(target.parent)
    temp = target.with_name(temporary_name(name, secrets.token_hex(4)))
    report = Reporter(progress, "export", size)
    TEMPORARY_FILES.add(temp)  # before it exists: a stop request in between finds it there
    try:
        linked = request.link and _try_link(source, temp)
        if linked:
            report(size, "hard link")
        else:
            _check_free_space(target.parent, size)
            _copy(source, temp, report, cancel or CancelToken())
        if temp.stat().st_size != size:
            copied = temp.stat().st_size
            raise ExportError(f"the copy of {source} has {copied} bytes, not {size}: a disk error?")
        description = verify_export(temp, request.kind)
        _refuse_to_overwrite(target, request.overwrite)  # it may have appeared meanwhile
        os.replace(temp, target)
    except PermissionError:
        raise ExportError(_permission_message(target.parent, target)) from None
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from e
    finally:
        _remove(temp)
    return ExportResult(target, description, size, linked)


def _remove(temp: Path) -> None:
    """Remove the temporary file if it is there; a folder that refuses even that leaves nothing to
    remove (the file could not have been created), or leaves it to the sweep on the way out."""
    try:
        temp.unlink(missing_ok=True)
    except OSError:
        return
    TEMPORARY_FILES.discard(temp)


def _refuse_to_overwrite(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise OutputExistsError(target)


def _make_folder(folder: Path) -> None:
    """Create a missing models folder whose parent exists (``models/diffusion_models`` in old installs)."""
    try:
        folder.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise ExportError(
            f"{folder} does not exist, nor does {folder.parent}; check the install or choose another folder"
        ) from None
    except FileExistsError:
        raise ExportError(f"{folder} is a file, not a folder; choose another folder") from None
    except PermissionError:
        raise ExportError(_permission_message(folder)) from None


def _check_free_space(folder: Path, size: int) -> None:
    free = shutil.disk_usage(folder).free
    if free - FREE_SPACE_RESERVE < size:
        raise ExportError(
            f"not enough space in {folder}: the file needs {format_bytes(size)} and {format_bytes(free)} is "
            f"free (keeping {format_bytes(FREE_SPACE_RESERVE)} spare); free up space or choose another folder"
        )


def _try_link(source: Path, temp: Path) -> bool:
    """Hard-link ``source`` as ``temp``; False where that cannot be (another filesystem, or one
    without hard links: then we copy)."""
    try:
        os.link(source, temp)
    except OSError as e:
        if e.errno == errno.EACCES:  # the folder is not writable (EPERM: a filesystem without links)
            raise
        return False
    return True


def _copy(source: Path, temp: Path, report: Reporter, cancel: CancelToken) -> None:
    done = 0
    buffer = bytearray(COPY_CHUNK)
    with open(source, "rb") as fin, open(temp, "xb") as fout:
        while n := fin.readinto(buffer):
            cancel.check()
            fout.write(memoryview(buffer)[:n])
            done += n
            report(done)
        fout.flush()
        os.fsync(fout.fileno())


def _permission_message(folder: Path, target: Path | None = None) -> str:
    if target is not None and target.is_file() and sys.platform == "win32":
        return f"cannot replace {target}: it is in use (close ComfyUI or choose another name)"
    return f"cannot write to {folder}: permission denied; choose another folder or fix its permissions"
