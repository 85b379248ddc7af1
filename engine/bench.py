"""The end-to-end benchmark job: seconds per denoising step of one model in each weight format, with
the quality cost of each format next to its speed.

Every format runs the same model on the same inputs (latents, timestep, random text embeddings of the
model's text width and a typical prompt length). Each format gets its own freshly built model (one at
a time on the device), a warm-up whose first call (compilation, kernel autotuning) is reported
separately, then ``steps`` timed steps; the median is reported. Quality is the relative error and
cosine similarity of the model's output against bf16 eager.

Formats: ``bf16``; ``bf16+compile`` (regional: see :func:`compile_blocks`); ``fp8`` (e4m3 weights with per-row scales and per-token activation
scales through ``torch._scaled_mm``, sm89+ only); ``int8`` (W8A8 through :class:`Int8Linear`); and
``int8+compile``; the int8 formats' attention runs in bf16 or int8 (``BenchRequest.attention``, else
as the file says). Quantized formats replace the layers the architecture allows (see
``Architecture.keeps_high_precision``).

``cuda_graphs``: every format's step is captured once into a CUDA graph after its warm-up and the
timed steps replay it. That removes the host's launch costs (Python, dispatch, one launch per kernel)
from every format alike, so the ratios show GPU work — what a machine whose CPU keeps ahead of its
GPU sees anyway (a fast desktop CPU with a consumer GPU), and what ``mode="reduce-overhead"`` aims at.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from engine.bench_measure import (
    DTYPE,
    Fp8Linear,
    compile_blocks,
    device_name,
    fp8_unsupported,
    free_memory,
    measure,
    to_device,
    versions,
)
from engine.bench_result import BenchResult, FormatResult
from engine.checkpoint import CheckpointReader
from engine.convert import ATTENTION_KEY
from engine.int8.apply import Int8Layers, quantizer
from engine.int8.attention import use_attention
from engine.int8.ops import describe_backend
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
from engine.jobs import CancelToken, JobError, ProgressFn, Reporter
from engine.models.build import (
    Fill,
    Make,
    build_model,
    checkpoint_filler,
    named_config,
    random_filler,
    streamed_blocks,
)
from engine.models.detect import detect
from engine.models.layers import Inputs
from engine.models.spec import Architecture, Config

FORMATS = ("bf16", "bf16+compile", "fp8", "int8", "int8+compile")
SEED = 0
CPU_MAX_PARAMS = 1e9  # a full-size model on the CPU would take hours per step


class BenchError(JobError):
    """A benchmark that cannot run as asked (bad settings, too little memory)."""


@dataclass(frozen=True)
class BenchRequest:
    source: str  # a checkpoint (file or diffusers folder) or a known model name ("flux2-klein-9b")
    resolution: int = 1024
    steps: int = 10
    formats: tuple[str, ...] = FORMATS
    scheme: Scheme = DEFAULT_SCHEME
    batch: int = 1
    warmup: int = 2  # untimed calls per format; the first one compiles and autotunes
    text_tokens: int | None = None  # default: the model's typical prompt length
    device: str | None = None  # "cpu", "cuda" or "cuda:N"; default: "cuda" when there is a GPU, else "cpu"
    cuda_graphs: bool = False  # time replays of a captured step (GPU only; module docstring)
    rotate: RotationPolicy = "none"  # which int8 layers are Hadamard-rotated (engine.int8.rotation)
    max_vram_gb: float | None = None  # run as on a GPU with this much memory (default: the device's own)
    attention: AttentionChoice | None = None  # the int8 formats' attention; None: the file's (ATTENTION_KEY), else bf16


GPU_DEFAULTS = BenchRequest("flux2-klein-9b")
"""What both faces measure when nothing else is chosen, on a GPU: a released size at 1024², every format."""
CPU_DEFAULTS = BenchRequest("flux2-tiny", resolution=256, steps=3, formats=("bf16", "int8"))
"""… and on the CPU: a tiny model, and no compiled format (compiling on a CPU takes minutes)."""


def bench_defaults(gpu: bool) -> BenchRequest:
    """The benchmark the app's form starts from and ``int8-studio bench`` runs without a model."""
    return GPU_DEFAULTS if gpu else CPU_DEFAULTS


# --- the job -------------------------------------------------------------------------------------


@dataclass
class _Source:
    arch: Architecture
    config: Config
    label: str
    filler: Callable[[torch.device, bool, Make | None], Fill]  # (device, keep int8 layers, make)
    int8_weights: frozenset[str] = frozenset()  # weights the file holds in int8 (used as they are)
    attention: AttentionChoice = DEFAULT_ATTENTION  # what the file asks for (convert --attention)

    def model(self, device: torch.device, keep_int8: bool = False, make: Make | None = None) -> nn.Module:
        model = build_model(self.arch, self.config)
        self.filler(device, keep_int8, make)(model, lambda _: True)
        return model

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.arch.tensor_shapes(self.config)

    @functools.cached_property
    def linears(self) -> list[str]:
        return [n for n, s in self.shapes.items() if len(s) == 2 and n.endswith(".weight")]

    @functools.cached_property
    def quantizable(self) -> frozenset[str]:
        """The linear weights the architecture allows in 8 bits."""
        return frozenset(n for n in self.linears if not self.arch.keeps_high_precision(n, self.shapes[n]))

    def weight_bytes(self, fmt: str) -> int:
        """The weights' size in format ``fmt``: 8-bit layers one byte per element, the rest bf16."""
        narrow = self.int8_weights if fmt.startswith("int8") and self.int8_weights else self.quantizable
        narrow = narrow if fmt.startswith(("int8", "fp8")) else frozenset()
        return sum(math.prod(s) * (1 if n in narrow else DTYPE.itemsize) for n, s in self.shapes.items())


def run_bench(
    request: BenchRequest, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> BenchResult:
    cancel = cancel or CancelToken()
    formats = _check(request)
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reader = CheckpointReader(request.source) if Path(request.source).exists() else None
    try:
        source = _source(request, reader)
        # the current device too: Triton launches its kernels there, whatever their tensors' device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return _bench(request, formats, source, device, progress, cancel)
    except torch.OutOfMemoryError:
        raise BenchError(
            f"out of GPU memory at {request.resolution}×{request.resolution}, batch {request.batch}: "
            "choose a lower resolution or batch, or close other programs using the GPU"
        ) from None
    finally:
        if reader is not None:
            reader.close()
        free_memory()


def _check(request: BenchRequest) -> list[str]:
    choices = ", ".join(FORMATS)
    if not request.formats:
        raise BenchError(f"no format to measure; choose from {choices}")
    for fmt in request.formats:
        if fmt not in FORMATS:
            raise BenchError(f"unknown format {fmt!r}; choose from {choices}")
    if request.resolution <= 0 or request.resolution % 16:
        raise BenchError(f"resolution {request.resolution} is not a positive multiple of 16")
    for name in ("steps", "batch", "warmup", "text_tokens"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise BenchError(f"{name.replace('_', ' ')} must be at least 1, got {value}")
    if request.device not in (None, "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", request.device):
        raise BenchError(f"unknown device {request.device!r}; choose cpu, cuda or cuda:N (a GPU's index)")
    if (request.device or "").startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(
                "no CUDA GPU found: benchmark on the CPU (small models only) or on a machine with one"
            )
        index, count = torch.device(request.device).index or 0, torch.cuda.device_count()
        if index >= count:
            raise BenchError(f"no CUDA GPU {index}: this machine has {count} (0–{count - 1})")
    if request.scheme not in SCHEMES:
        raise BenchError(f"unknown scheme {request.scheme!r}; choose from {', '.join(SCHEMES)}")
    if request.rotate not in ROTATION_POLICIES:
        raise BenchError(f"unknown rotation {request.rotate!r}; choose from {', '.join(ROTATION_POLICIES)}")
    if request.attention not in (None, *ATTENTIONS):
        raise BenchError(f"unknown attention {request.attention!r}; choose from {', '.join(ATTENTIONS)}")
    if request.max_vram_gb is not None and not request.max_vram_gb > 0:
        raise BenchError(f"max VRAM must be a positive number of GB, got {request.max_vram_gb:g}")
    if request.cuda_graphs and (request.device == "cpu" or not torch.cuda.is_available()):
        raise BenchError("CUDA graphs need a CUDA GPU: benchmark without them on the CPU")
    return [f for f in FORMATS if f in request.formats]


def _source(request: BenchRequest, reader: CheckpointReader | None) -> _Source:
    if reader is None:
        arch, config, label = named_config(request.source)
        return _Source(
            arch,
            config,
            f"{label} (random weights)",
            lambda device, _, make: random_filler(arch, device, DTYPE, SEED, make),
        )
    detected = detect(reader)
    return _Source(
        detected.arch,
        detected.config,
        f"{detected.label} ({Path(request.source).name}, {detected.source_format})",
        lambda device, keep_int8, make: checkpoint_filler(
            reader, detected, device, DTYPE, make=make, stored=Int8Layers(reader, detected, DTYPE, not keep_int8)
        ),
        frozenset(f"{layer}.weight" for layer in detected.int8_layers),
        reader.metadata.get(ATTENTION_KEY, DEFAULT_ATTENTION),
    )


def _bench(
    request: BenchRequest,
    formats: list[str],
    source: _Source,
    device: torch.device,
    progress: ProgressFn | None,
    cancel: CancelToken,
) -> BenchResult:
    arch = source.arch
    attention = request.attention or source.attention
    params = sum(math.prod(s) for s in source.shapes.values())
    if device.type == "cpu" and params > CPU_MAX_PARAMS:
        tiny = ", ".join(f"{arch.name}-{v}" for v in arch.tiny)
        raise BenchError(
            f"{source.label} has {params / 1e9:.1f}B parameters: benchmark it on a CUDA GPU; "
            f"on the CPU use a small model such as {tiny}"
        )
    budget = _memory_budget(request, device)
    calls = request.warmup + request.steps
    report = Reporter(progress, "benchmark", len(formats) * calls)
    done = 0

    def tick(message: str, count: int = 1) -> None:
        nonlocal done
        done += count
        report(done, message)

    def build(fmt: str) -> nn.Module:
        """The format's model; quantized layers are converted as they are loaded, so the float model
        is never on the device whole."""
        base, _, compiled = fmt.partition("+")
        make = None
        if base == "int8" and not source.int8_weights:
            make = quantizer(arch, request.scheme, request.rotate)
        elif base == "fp8":
            make = lambda _, linear: Fp8Linear(linear)
        model = source.model(device, base == "int8", make)
        if base == "int8":
            use_attention(model, attention)
        return compile_blocks(model) if compiled else model

    def attempt(fmt: str):
        """``measure``'s result for ``fmt``, or None when it ran out of device memory."""
        try:
            return measure(
                build(fmt), inputs, request.warmup, request.steps, request.cuda_graphs, device, cancel, tick, fmt
            )
        except torch.OutOfMemoryError:
            return None

    meta = build_model(arch, source.config)  # no weights: the inputs' shapes and defaults
    inputs = to_device(meta.random_inputs(request.batch, request.resolution, request.text_tokens, SEED), device)
    text_tokens = request.text_tokens or meta.text_tokens
    rows, outputs = [], {}
    with _memory_limit(request, device):
        for fmt in formats:
            cancel.check()
            before = done
            note = fp8_unsupported(device) if fmt == "fp8" else None
            need = source.weight_bytes(fmt)
            if note is None and budget is not None and need > budget:
                note = f"does not fit: its weights take {_size(need)} of the {_size(budget)} available"
            if note is None:
                measured = attempt(fmt)
                free_memory()
                if measured is None:
                    note = f"out of GPU memory (weights {_size(need)} of {_size(budget)}): try a lower resolution or batch"
            if note:
                tick(f"{fmt}: {note}", before + calls - done)
                rows.append(FormatResult(fmt, note=note))
                continue
            rows.append(
                FormatResult(
                    fmt, measured.seconds, None, max(0.0, measured.first - measured.seconds), measured.peak_gb,
                    launch_bound=measured.launch_bound,
                )
            )  # fmt: skip
            outputs[fmt] = measured.out
        reference = outputs.get("bf16")
        if reference is None and outputs:
            reference = _reference(source, inputs, device, budget is None or source.weight_bytes("bf16") <= budget)
    rows = [_with_errors(r, outputs[r.format], reference) if r.format in outputs else r for r in rows]
    return BenchResult(
        model=source.label,
        device=device_name(device),
        versions=versions(device),
        resolution=request.resolution,
        batch=request.batch,
        steps=request.steps,
        image_tokens=(request.resolution // 16) ** 2,  # every family: 16× fewer tokens per side than pixels
        text_tokens=text_tokens,
        scheme=("as in the file" if source.int8_weights else _scheme_label(request))
        + (", int8 attention" if attention == "int8" else ""),
        quantized_layers=len(source.int8_weights or source.quantizable),
        linear_layers=len(source.linears),
        cuda_graphs=request.cuda_graphs,
        int8_backend=describe_backend(device) if any(f.startswith("int8") for f in formats) else "",
        rows=tuple(_with_speedups(rows)),
    )


def _reference(source: _Source, inputs: Inputs, device: torch.device, fits: bool) -> torch.Tensor:
    """bf16 eager's output on ``inputs``, on the CPU in float32. Where the bf16 model does not fit on
    the device, its blocks are loaded one at a time (:func:`streamed_blocks`): slow, but the same output."""
    with torch.no_grad():
        if fits:
            try:
                return source.model(device)(**inputs).float().cpu()
            except torch.OutOfMemoryError:
                pass
            free_memory()
        model = build_model(source.arch, source.config)
        with streamed_blocks(model, source.filler(device, False, None)) as model:
            return model(**inputs).float().cpu()


def _with_errors(row: FormatResult, out: torch.Tensor, reference: torch.Tensor) -> FormatResult:
    error = ((out - reference).norm() / reference.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
    return replace(row, relative_error=error, cosine=cosine)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _memory_budget(request: BenchRequest, device: torch.device) -> float | None:
    """Bytes the formats may use: ``max_vram_gb``, else the GPU's memory (None on the CPU: no limit)."""
    if request.max_vram_gb is not None:
        return request.max_vram_gb * 1e9
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return None


@contextlib.contextmanager
def _memory_limit(request: BenchRequest, device: torch.device):
    """The GPU's allocator capped at ``max_vram_gb`` (a smaller GPU's memory) while the formats run; on
    the CPU the limit only decides which formats' weights fit."""
    if request.max_vram_gb is None or device.type != "cuda":
        yield
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    free_memory()  # the cap counts what this process's allocator holds, cached blocks included
    torch.cuda.set_per_process_memory_fraction(min(1.0, request.max_vram_gb * 1e9 / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def _scheme_label(request: BenchRequest) -> str:
    rotated = {"none": "", "down": ", down-projections rotated", "all": ", rotated"}[request.rotate]
    return request.scheme + rotated


def _with_speedups(rows: list[FormatResult]) -> list[FormatResult]:
    """Each row's speed-up against bf16 with the same compile setting (when both ran)."""
    seconds = {r.format: r.seconds_per_step for r in rows}
    out = []
    for r in rows:
        baseline = seconds.get("bf16+compile" if r.format.endswith("+compile") else "bf16")
        if r.seconds_per_step and baseline:
            r = replace(r, speedup=baseline / r.seconds_per_step)
        out.append(r)
    return out


