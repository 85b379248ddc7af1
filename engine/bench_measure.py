"""Measuring one format of a model on a device, for the benchmark job (:mod:`engine.bench`): the pieces
its models are built from (row-wise fp8 layers, regional compilation, inputs in bf16), timing a step
(warm-up, an optional CUDA graph, the median, whether the host kept the GPU waiting) and what the
machine is.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from engine.bench_result import gpu_device
from engine.jobs import CancelToken
from engine.models.layers import Inputs

DTYPE = torch.bfloat16
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
LAUNCH_BOUND = 0.95
"""A step the host took this share of its time to enqueue kept the GPU waiting for it: GPU-bound steps
stay well below, launch-bound ones reach it (docs/PERFORMANCE.md, "512²")."""


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


# --- timing a step -------------------------------------------------------------------------------


class Measured(NamedTuple):
    seconds: float  # median per step
    first: float  # the first call
    out: torch.Tensor  # the last step's output, float32 on the CPU
    peak_gb: float | None
    launch_bound: bool | None  # the host took LAUNCH_BOUND of the step to enqueue it (GPU only)


def measure(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    warmup: int,
    steps: int,
    cuda_graphs: bool,
    device: torch.device,
    cancel: CancelToken,
    tick: Callable[[str], None],
    fmt: str,
) -> Measured:
    """Run ``model`` on ``inputs``: ``warmup`` untimed calls (the first one timed on its own), then
    ``steps`` timed ones, replayed from a CUDA graph with ``cuda_graphs``."""
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
        for _ in range(warmup - 1):
            call()
            tick(f"{fmt}: warm-up")
        if cuda_graphs:
            run = captured(run, device)
        times, enqueued = [], []
        for step in range(steps):
            seconds, host, out = call()
            times.append(seconds)
            enqueued.append(host)
            tick(f"{fmt}: step {step + 1}/{steps}")
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    bound = statistics.median(enqueued) >= LAUNCH_BOUND * seconds if cuda else None
    return Measured(seconds, first, out.float().cpu(), peak, bound)


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


# --- the machine ---------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The device as the result names it: the GPU and its compute capability, or the CPU."""
    if device.type == "cuda":
        return gpu_device(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    if not torch.cuda.is_available():
        return "CPU — no CUDA GPU found: int8 runs its reference CPU path, times are not representative"
    return "CPU"


def versions(device: torch.device) -> dict[str, str]:
    """The versions of what the timings depend on: torch, triton, CUDA."""
    versions = {"torch": torch.__version__.split("+")[0]}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        versions["CUDA"] = str(torch.version.cuda)
    return versions


def free_memory() -> None:
    """Release the last model: compiled graphs, Python references, cached device memory."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
