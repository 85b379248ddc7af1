"""The end-to-end benchmark job: seconds per denoising step of one model in each weight format, with
the quality cost of each format next to its speed.

Every format runs the same model on the same inputs (latents, timestep, random text embeddings of the
model's text width and a typical prompt length). Each format gets its own freshly built model (one at
a time on the device), a warm-up whose first call (compilation, kernel autotuning) is reported
separately, then ``steps`` timed steps; the median is reported. Quality is the relative error and
cosine similarity of the model's output against bf16 eager.

Formats: ``bf16``; ``bf16+compile`` (regional: see :func:`compile_blocks`); ``fp8`` (e4m3 weights with per-row scales and per-token activation
scales through ``torch._scaled_mm``, sm89+ only); ``int8`` (W8A8 through :class:`Int8Linear`); and
``int8+compile``. Quantized formats replace the layers the architecture allows (see
``Architecture.keeps_high_precision``).

``cuda_graphs``: every format's step is captured once into a CUDA graph after its warm-up and the
timed steps replay it. That removes the host's launch costs (Python, dispatch, one launch per kernel)
from every format alike, so the ratios show GPU work — what a machine whose CPU keeps ahead of its
GPU sees anyway (a fast desktop CPU with a consumer GPU), and what ``mode="reduce-overhead"`` aims at.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from engine.checkpoint import CheckpointReader
from engine.int8.apply import Int8Layers, quantizer
from engine.int8.ops import describe_backend
from engine.int8.quantize import SCHEMES, Scheme
from engine.int8.rotation import ROTATION_POLICIES, RotationPolicy
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
DTYPE = torch.bfloat16
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
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
    scheme: Scheme = "rowwise"
    batch: int = 1
    warmup: int = 2  # untimed calls per format; the first one compiles and autotunes
    text_tokens: int | None = None  # default: the model's typical prompt length
    device: str | None = None  # "cpu", "cuda" or "cuda:N"; default: "cuda" when there is a GPU, else "cpu"
    cuda_graphs: bool = False  # time replays of a captured step (GPU only; module docstring)
    rotate: RotationPolicy = "none"  # which int8 layers are Hadamard-rotated (engine.int8.rotation)
    max_vram_gb: float | None = None  # run as on a GPU with this much memory (default: the device's own)


GPU_DEFAULTS = BenchRequest("flux2-klein-9b")
"""What both faces measure when nothing else is chosen, on a GPU: a released size at 1024², every format."""
CPU_DEFAULTS = BenchRequest("flux2-tiny", resolution=256, steps=3, formats=("bf16", "int8"))
"""… and on the CPU: a tiny model, and no compiled format (compiling on a CPU takes minutes)."""


def bench_defaults(gpu: bool) -> BenchRequest:
    """The benchmark the app's form starts from and ``int8-studio bench`` runs without a model."""
    return GPU_DEFAULTS if gpu else CPU_DEFAULTS


@dataclass(frozen=True)
class FormatResult:
    format: str
    seconds_per_step: float | None = None  # median of the timed steps; None: not run (see note)
    speedup: float | None = None  # against bf16 with the same compile setting
    compile_seconds: float | None = None  # first call minus a step: compilation and autotuning
    peak_vram_gb: float | None = None  # weights + activations while stepping (GPU only)
    relative_error: float | None = None  # ‖out − out_bf16‖ / ‖out_bf16‖
    cosine: float | None = None
    note: str = ""
    launch_bound: bool | None = None  # the GPU waited for the host to enqueue the step (None: on the CPU)


@dataclass(frozen=True)
class BenchResult:
    model: str  # "Flux.2 Klein 9B (random weights)"
    device: str
    versions: dict[str, str]
    resolution: int
    batch: int
    steps: int
    image_tokens: int
    text_tokens: int
    scheme: str
    quantized_layers: int  # linear layers in int8/fp8 (the rest stay bf16)
    linear_layers: int
    cuda_graphs: bool = False
    int8_backend: str = ""  # ops.describe_backend: what the int8 rows ran on ("" when none ran)
    rows: tuple[FormatResult, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchResult:
        """The result back from :meth:`to_dict` (the app keeps results between runs); keys this
        version does not know are left out."""
        rows = tuple(FormatResult(**_known(FormatResult, row)) for row in data.get("rows", ()))
        return cls(**{**_known(cls, data), "rows": rows})

    def header(self) -> list[str]:
        """What was measured, on what, and how: the table's three first lines, the app's run summary."""
        shape = f"{self.resolution}×{self.resolution}, batch {self.batch}"
        tokens = f"{self.image_tokens} image + {self.text_tokens} text tokens"
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        layers = f"{self.quantized_layers} of {self.linear_layers} linear layers quantized"
        gemm = f"; int8 GEMM: {self.int8_backend}" if self.int8_backend else ""
        steps = f"median of {self.steps} steps" + (", replayed from a CUDA graph" if self.cuda_graphs else "")
        return [
            f"{self.model}: {shape} ({tokens}), {steps}",
            f"{self.device}; {versions}",
            f"{layers} ({self.scheme} int8 weight scales, per-token activation scales){gemm}",
        ]

    def table(self) -> str:
        """The result as text: the :meth:`header`, one row per format, a footnote."""
        head = [*self.header(), ""]
        lines = [COLUMNS, *(cells(r) for r in self.rows)]
        bound = any(r.launch_bound for r in self.rows)
        # a row that did not run holds its note in the second column: it sets no width
        widths = [max(len(line[i]) for line in lines if i == 0 or len(line) > 2) for i in range(len(COLUMNS))]
        body = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        foot = [
            "",
            (
                "speed-up: against bf16 with the same compile setting; errors: against bf16 eager "
                "(run one block at a time where it does not fit)"
            ),
            *[LAUNCH_BOUND_NOTE] * bound,
        ]
        return "\n".join(head + body + foot)


COLUMNS = ("format", "s/step", "speed-up", "first call", "peak VRAM", "rel. error", "cosine")
LAUNCH_BOUND = 0.95
"""A step the host took this share of its time to enqueue kept the GPU waiting for it (Klein 9B at 512²
on an H200 machine: int8 steps 100%, GPU-bound steps 30–70%; PERFORMANCE.md)."""
LAUNCH_BOUND_NOTE = (
    "*: launch-bound, the GPU waited for the CPU to enqueue the step's kernels (--cuda-graphs shows the GPU's "
    "own speed)"
)


def _known(cls: type, data: dict) -> dict:
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


def cells(r: FormatResult) -> tuple[str, ...]:
    """A row's cells under :data:`COLUMNS`, in the CLI's table and the app's; a format that did not run
    has two, its name and its note."""
    if r.seconds_per_step is None:
        return (r.format, r.note or "not run")

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else fmt.format(value)

    return (
        r.format,
        f"{r.seconds_per_step:.3f}" + "*" * bool(r.launch_bound),
        cell(r.speedup, "{:.2f}×"),
        cell(r.compile_seconds, "{:.1f} s"),
        cell(r.peak_vram_gb, "{:.1f} GB"),
        cell(r.relative_error, "{:.2%}"),
        cell(r.cosine, "{:.5f}"),
    )


# --- the comparison format: row-wise fp8 ---------------------------------------------------------


class Fp8Linear(nn.Module):
    """fp8 (e4m3) W8A8 through ``torch._scaled_mm``: per-row weight scales, per-token activation
    scales computed on the fly. The fastest format cuBLAS offers on sm89+; here only to compare."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (w / scale).to(FP8))
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        q = (x2 / x_scale).to(FP8)
        y = torch._scaled_mm(
            q, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """Inputs on ``device``, floating-point ones in bf16 (the dtype every format computes in)."""
    return {k: v.to(device, DTYPE) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def compile_blocks(model: nn.Module) -> nn.Module:
    """``torch.compile`` each repeated block in place (the elements of every ``nn.ModuleList``),
    without graph breaks. Blocks of one kind share one compiled graph, so compiling takes one block's
    time instead of the whole model's; what runs between blocks is a few small ops."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.compile(fullgraph=True)
    return model


def fp8_unsupported(device: torch.device) -> str | None:
    """Why row-wise fp8 cannot run on ``device`` (None: it can)."""
    if device.type != "cuda":
        return "n/a (needs a CUDA GPU, sm89+)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "n/a (needs sm89+)"
    return None


# --- the job -------------------------------------------------------------------------------------


@dataclass
class _Source:
    arch: Architecture
    config: Config
    label: str
    filler: Callable[[torch.device, bool, Make | None], Fill]  # (device, keep int8 layers, make)
    int8_weights: frozenset[str] = frozenset()  # weights the file holds in int8 (used as they are)

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
            "lower --res or --batch, or close other programs using the GPU"
        ) from None
    finally:
        if reader is not None:
            reader.close()
        _free()


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
        frozenset(f"{layer}.weight" for layer, fmt in detected.layer_formats.items() if fmt.startswith("int8")),
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
        return compile_blocks(model) if compiled else model

    def attempt(fmt: str):
        """``_measure``'s result for ``fmt``, or None when it ran out of device memory."""
        try:
            return _measure(build(fmt), inputs, request, device, cancel, tick, fmt)
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
                _free()
                if measured is None:
                    note = f"out of GPU memory (weights {_size(need)} of {_size(budget)}): lower --res or --batch"
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
        device=_device_name(device),
        versions=_versions(device),
        resolution=request.resolution,
        batch=request.batch,
        steps=request.steps,
        image_tokens=(request.resolution // 16) ** 2,  # every family: 16× fewer tokens per side than pixels
        text_tokens=text_tokens,
        scheme="as in the file" if source.int8_weights else _scheme_label(request),
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
            _free()
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
    _free()  # the cap counts what this process's allocator holds, cached blocks included
    torch.cuda.set_per_process_memory_fraction(min(1.0, request.max_vram_gb * 1e9 / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


class _Measured(NamedTuple):
    seconds: float  # median per step
    first: float  # the first call
    out: torch.Tensor  # the last step's output, float32 on the CPU
    peak_gb: float | None
    launch_bound: bool | None  # the host took LAUNCH_BOUND of the step to enqueue it (GPU only)


def _measure(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    request: BenchRequest,
    device: torch.device,
    cancel: CancelToken,
    tick: Callable[[str], None],
    fmt: str,
) -> _Measured:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    run = functools.partial(model, **inputs)

    def call() -> tuple[float, float, torch.Tensor]:
        """``(seconds, seconds until the host had enqueued the step, output)``."""
        cancel.check()
        start = time.perf_counter()
        out = run()
        enqueued = time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, enqueued, out

    with torch.no_grad():
        first, _, _ = call()
        tick(f"{fmt}: warm-up")
        for _ in range(request.warmup - 1):
            call()
            tick(f"{fmt}: warm-up")
        if request.cuda_graphs:
            run = captured(run, device)
        times, enqueued = [], []
        for step in range(request.steps):
            seconds, host, out = call()
            times.append(seconds)
            enqueued.append(host)
            tick(f"{fmt}: step {step + 1}/{request.steps}")
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    bound = statistics.median(enqueued) >= LAUNCH_BOUND * seconds if cuda else None
    return _Measured(seconds, first, out.float().cpu(), peak, bound)


def captured(step: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """``step`` captured into a CUDA graph: a function that replays it and returns its (static) output.
    The step must have run before (compiled, tuned), and must not synchronize with the host."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # allocations of a first run on the capturing stream
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    if not torch.cuda.is_available():
        return "CPU — no CUDA GPU found: int8 runs its reference CPU path, times are not representative"
    return "CPU"


def _versions(device: torch.device) -> dict[str, str]:
    versions = {"torch": torch.__version__.split("+")[0]}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        versions["CUDA"] = str(torch.version.cuda)
    return versions


def _free() -> None:
    """Release the last model: compiled graphs, Python references, cached device memory."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
