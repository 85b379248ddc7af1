"""Convert a diffusion-transformer checkpoint into an INT8 single file that ComfyUI loads as it is.

The job streams: it reads the source's headers, detects the model, lays out the whole output (names,
dtypes, shapes, metadata) up front, then builds, quantizes and writes one tensor at a time. Peak
memory is the largest tensor's sources plus its int8 copy and a few bounded float32 chunks, whatever
the size of the model. The output format is described in docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from engine import __version__
from engine.checkpoint import CheckpointError, CheckpointReader, check_memory
from engine.checkpoint_writer import CheckpointWriter
from engine.int8.apply import rotation_group
from engine.int8.choices import (
    ATTENTIONS,
    DEFAULT_ATTENTION,
    DEFAULT_SCHEME,
    ROTATION_POLICIES,
    SCHEMES,
    AttentionChoice,
    RotationPolicy,
    Scheme,
)
from engine.int8.quantize import quantize_weight
from engine.int8.rotation import comfy_quant_entry, json_bytes
from engine.jobs import (
    CancelToken,
    JobError,
    OutputExistsError,
    ProgressFn,
    Reporter,
    check_name,
    display_name,
)
from engine.models import DetectedModel, OutputTensor, detect
from engine.models.spec import natural_key

METADATA_PREFIX = "int8_studio."
SHA256_KEY = METADATA_PREFIX + "source_sha256"
ATTENTION_KEY = METADATA_PREFIX + "attention"
"""How our engine runs the file's attention: ``bf16`` or ``int8`` (``engine.int8.attention.use_attention``)."""
ROTATION_SUFFIX = {"none": "", "down": "-rotdown", "all": "-rotated"}
"""What each rotation policy adds to the default output name."""
HASH_CHUNK = 8 << 20


class ConvertError(JobError):
    """A conversion that cannot start: bad options, an INT8 source, an output in the way."""


@dataclass(frozen=True)
class ConvertRequest:
    source: Path
    output: Path | None = None  # default: <stem>-int8-<scheme>.safetensors beside the source
    scheme: Scheme = DEFAULT_SCHEME
    keep: tuple[str, ...] = ()  # fnmatch patterns of single-file names kept in high precision
    cast_float32_to_bf16: bool = False  # high-precision float32 tensors are written as bf16
    overwrite: bool = False
    device: str | None = None  # where quantization runs; None: the GPU when there is one
    rotate: RotationPolicy = "none"  # which int8 layers are Hadamard-rotated (engine.int8.rotation)
    attention: AttentionChoice = DEFAULT_ATTENTION  # recorded for our engine (ATTENTION_KEY)


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    model: str  # "Flux.2 Klein 9B"
    scheme: Scheme
    quantized: int  # layers stored as int8
    rotated: int  # of those, Hadamard-rotated
    kept: int  # tensors copied in high precision
    left_out: int  # source tensors outside the diffusion model (a full checkpoint's VAE, …)
    bytes_in: int
    bytes_out: int
    seconds: float


def source_root(model: DetectedModel, reader: CheckpointReader) -> Path:
    """The source as a user names it: the file, or the diffusers model folder (holding transformer/)."""
    first = reader.files[0]
    if model.layout == "single-file":
        return first
    return first.parent.parent if first.parent.name == "transformer" else first.parent


def named_beside(model: DetectedModel, reader: CheckpointReader, suffix: str) -> Path:
    """``<stem><suffix>.safetensors`` beside the source file, or beside a diffusers model folder: where
    the jobs put what they make from a source when no output is given."""
    root = source_root(model, reader)
    stem = root.name.removesuffix(".safetensors") if root.is_file() else root.name
    return root.parent / f"{stem}{suffix}.safetensors"


def default_output(model: DetectedModel, reader: CheckpointReader, scheme: str, rotate: str = "none") -> Path:
    """``<stem>-int8-<scheme>[-rotated|-rotdown].safetensors`` beside the source."""
    return named_beside(model, reader, f"-int8-{scheme}{ROTATION_SUFFIX[rotate]}")


def run_convert(
    request: ConvertRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> ConvertResult:
    """Convert ``request.source``; raises a :class:`JobError` for bad input, leaving no file behind."""
    started = time.monotonic()
    cancel = cancel or CancelToken()
    if request.scheme not in SCHEMES:
        raise ConvertError(f"unknown scheme '{request.scheme}'; choose {' or '.join(SCHEMES)}")
    if request.rotate not in ROTATION_POLICIES:
        raise ConvertError(f"unknown rotation '{request.rotate}'; choose {', '.join(ROTATION_POLICIES)}")
    if request.attention not in ATTENTIONS:
        raise ConvertError(f"unknown attention '{request.attention}'; choose {' or '.join(ATTENTIONS)}")
    with CheckpointReader(request.source) as reader:
        model = detect(reader)
        _refuse_int8(model, reader)
        quantized = _quantized_layers(model, request)
        layout = _output_layout(model, quantized, request.scheme, request.cast_float32_to_bf16)
        output = _check_output(request, model, reader)
        hasher = Hasher(reader.files)
        metadata = _metadata(reader, model, request, quantized)
        metadata[SHA256_KEY] = _sha256_value(hasher.placeholder())  # filled in once the hash is done
        hasher.start()
        try:
            with CheckpointWriter(output, layout, metadata, overwrite=request.overwrite) as writer:
                report = Reporter(progress, "converting", _source_bytes(model, reader) + hasher.total)
                _write(reader, model, quantized, request, writer, report, hasher, cancel)
                writer.set_metadata(SHA256_KEY, _sha256_value(hasher.result(report, cancel)))
                writer.commit()
        finally:
            hasher.stop()
        bytes_in = sum(f.stat().st_size for f in reader.files)
    return ConvertResult(
        output=output,
        model=model.label,
        scheme=request.scheme,
        quantized=len(quantized),
        rotated=sum(1 for group in quantized.values() if group),
        kept=len(model.tensors) - len(quantized),
        left_out=len(model.other_tensors),
        bytes_in=bytes_in,
        bytes_out=output.stat().st_size,
        seconds=time.monotonic() - started,
    )


# --- planning -------------------------------------------------------------------------------------


def _refuse_int8(model: DetectedModel, reader: CheckpointReader) -> None:
    int8 = sorted({fmt for fmt in model.layer_formats.values() if fmt.startswith("int8")})
    if int8:
        raise ConvertError(
            f"{source_root(model, reader).name} is already INT8 ({', '.join(int8)}); "
            "convert the original bf16/fp8 checkpoint instead"
        )


def _quantized_layers(model: DetectedModel, request: ConvertRequest) -> dict[str, int]:
    """Output weights that become int8 (what the architecture allows, less the user's keep
    patterns), each with the Hadamard group size it is rotated with (0: not rotated)."""
    names = _quantized_names(model, request.keep)
    return {
        t.name: rotation_group(model.arch, t.name, t.shape, request.rotate) for t in model.tensors if t.name in names
    }


def _quantized_names(model: DetectedModel, keep: tuple[str, ...]) -> set[str]:
    names = [t.name for t in model.tensors]
    for pattern in keep:
        if not any(fnmatchcase(n, pattern) for n in names):
            example = min((t.name for t in model.tensors if t.quantize), key=natural_key, default=names[0])
            raise ConvertError(
                f"keep pattern '{pattern}' matches no tensor of this {model.arch.label} model "
                f"(names look like '{example}')"
            )
    return {t.name for t in model.tensors if t.quantize and not any(fnmatchcase(t.name, p) for p in keep)}


Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _output_layout(
    model: DetectedModel, quantized: dict[str, int], scheme: Scheme, cast_float32: bool
) -> Layout:
    """Every output tensor's dtype and shape, in file order (the writer puts the header first)."""
    layout: Layout = {}
    for t in model.tensors:
        if t.name in quantized:
            layer = t.name.removesuffix(".weight")
            layout[t.name] = (torch.int8, t.shape)
            layout[f"{layer}.weight_scale"] = (
                torch.float32,
                () if scheme == "tensorwise" else (t.shape[0], 1),
            )
            marker = json_bytes(comfy_quant_entry(quantized[t.name]))
            layout[f"{layer}.comfy_quant"] = (torch.uint8, tuple(marker.shape))
        else:
            layout[t.name] = (_kept_dtype(t, cast_float32), t.shape)
    return layout


def _kept_dtype(t: OutputTensor, cast_float32: bool) -> torch.dtype:
    return torch.bfloat16 if cast_float32 and t.dtype == torch.float32 else t.dtype


def _check_output(request: ConvertRequest, model: DetectedModel, reader: CheckpointReader) -> Path:
    """The output path, refused before the long hashing pass if it cannot or must not be written.

    The writer checks the target again (and the free space) when it opens.
    """
    output = Path(request.output or default_output(model, reader, request.scheme, request.rotate))
    if output.suffix != ".safetensors":
        raise ConvertError(f"the output {output.name} must be a .safetensors file")
    check_name(output)
    if any(output.resolve() == f.resolve() for f in reader.files):
        raise ConvertError(f"the output {output} is the source itself; choose another output name")
    if not output.parent.is_dir():
        raise ConvertError(f"output folder {output.parent} does not exist; create it or choose another")
    if output.exists() and not request.overwrite:
        raise OutputExistsError(output)
    return output


class Hasher(threading.Thread):
    """SHA-256 of the source files on a thread of its own, so that hashing (a full read of the
    source) overlaps the conversion instead of adding a pass before it. hashlib and file reads
    release the GIL."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(name="sha256", daemon=True)
        self.files = files
        self.total = sum(f.stat().st_size for f in files)
        self.done = 0  # bytes hashed so far (read by the job's thread for progress)
        self.digests: dict[str, str] = {}
        self.error: str | None = None  # why a file could not be read
        self._halt = threading.Event()

    def placeholder(self) -> dict[str, str]:
        return {f.name: "0" * 64 for f in self.files}

    def run(self) -> None:
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        try:
            for file in self.files:
                digest = hashlib.sha256()
                with open(file, "rb", buffering=0) as f:
                    while not self._halt.is_set() and (n := f.readinto(buffer)):
                        digest.update(view[:n])
                        self.done += n
                self.digests[file.name] = digest.hexdigest()
        except OSError as e:
            self.error = f"cannot read {file}: {e.strerror or e}"

    def result(self, report: Reporter, cancel: CancelToken) -> dict[str, str]:
        """Wait for the digests (file name → hex), still reporting progress and honouring cancel."""
        while self.is_alive():
            self.join(0.1)
            report(report.total - self.total + self.done, "hashing the source")
            cancel.check()
        if self.error is not None:
            raise CheckpointError(self.error)
        return self.digests

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _sha256_value(digests: dict[str, str]) -> str:
    """The hex digest of a single file; a JSON object file name → digest for a sharded source."""
    return next(iter(digests.values())) if len(digests) == 1 else json.dumps(digests)


def _metadata(
    reader: CheckpointReader, model: DetectedModel, request: ConvertRequest, quantized: dict[str, int]
) -> dict[str, str]:
    """The source's metadata that still holds, our own keys, and ComfyUI's ``_quantization_metadata``."""
    layers = {
        t.name.removesuffix(".weight"): comfy_quant_entry(quantized[t.name])
        for t in model.tensors
        if t.name in quantized
    }
    ours = {
        "version": __version__,
        "scheme": request.scheme,
        "architecture": model.arch.name,
        "variant": model.variant,
        "source_name": display_name(source_root(model, reader).name),
        "source_format": model.source_format,
        "attention": request.attention,
    }
    if request.keep:
        ours["keep"] = json.dumps(list(request.keep))
    if request.rotate != "none":
        ours["rotate"] = request.rotate
    kept = {k: v for k, v in reader.metadata.items() if not _stale(k)}
    return {
        **kept,
        "_quantization_metadata": json.dumps({"layers": layers}),
        **{METADATA_PREFIX + k: v for k, v in ours.items()},
    }


def _stale(key: str) -> bool:
    """Source metadata that no longer holds for the output: hashes of its bytes, its quantization."""
    lowered = key.lower()
    return (
        key == "_quantization_metadata"
        or key.startswith(METADATA_PREFIX)
        or "hash" in lowered
        or "sha256" in lowered
    )


# --- writing --------------------------------------------------------------------------------------


def _source_bytes(model: DetectedModel, reader: CheckpointReader, tensor: OutputTensor | None = None) -> int:
    """Bytes of the source read to build ``tensor`` (all of the plan by default)."""
    tensors = [tensor] if tensor else model.tensors
    return sum(reader.tensors[s].nbytes for t in tensors for s in t.sources)


def finite(tensor: torch.Tensor) -> bool:
    """True unless a float tensor holds NaN or Inf (one-byte floats are widened to be checked)."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor if tensor.dtype.itemsize > 1 else tensor.float()).all())


def working_bytes(reader: CheckpointReader, t: OutputTensor, quantize: bool) -> int:
    """Memory building ``t`` takes at most: its sources, the tensor itself and, to quantize it, a
    float32 copy and its int8 result."""
    sources = sum(reader.tensors[s].nbytes for s in t.sources)
    numel = t.nbytes // t.dtype.itemsize
    return sources + t.nbytes + (numel * 5 if quantize else 0)


def _write(
    reader: CheckpointReader,
    model: DetectedModel,
    quantized: dict[str, int],
    request: ConvertRequest,
    writer: CheckpointWriter,
    report: Reporter,
    hasher: Hasher,
    cancel: CancelToken,
) -> None:
    """Build, quantize and write every tensor of the plan in order; progress counts bytes read and
    bytes hashed."""
    device = torch.device(request.device) if request.device else None
    done = 0

    def not_finite() -> ConvertError:
        return ConvertError(
            f"{source_root(model, reader).name}: tensor '{model.prefix}{t.name}' has NaN or Inf "
            "values (the file is corrupt); download or export it again"
        )

    for t in model.tensors:
        cancel.check()
        check_memory(f"tensor '{model.prefix}{t.name}'", working_bytes(reader, t, t.name in quantized))
        tensor = t.build([reader.get(s) for s in t.sources])
        if t.name in quantized:
            layer = t.name.removesuffix(".weight")
            try:
                q, scale = quantize_weight(tensor, request.scheme, device, quantized[t.name])
            except ValueError as e:
                raise not_finite() from e
            writer.write(t.name, q)
            writer.write(f"{layer}.weight_scale", scale)
            writer.write(f"{layer}.comfy_quant", json_bytes(comfy_quant_entry(quantized[t.name])))
        else:
            if not finite(tensor):
                raise not_finite()
            writer.write(t.name, tensor.to(_kept_dtype(t, request.cast_float32_to_bf16)))
        del tensor
        done += _source_bytes(model, reader, t)
        report(done + hasher.done, t.name)
