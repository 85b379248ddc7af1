"""The machine the app runs on, in words: GPUs (and whether INT8 pays on them: the last benchmark's
advice for that GPU, else a guess from its compute capability) and system RAM."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from engine.advice import Advice, advise
from engine.bench_result import BenchResult, gpu_device
from engine.checkpoint import format_bytes

CPU_ONLY = "CPU only: INT8 speed-up needs an NVIDIA GPU"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    vram_bytes: int
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}"

    @property
    def int8_pays(self) -> bool:
        """INT8 tensor cores arrived with Turing (sm75): Ampere, Ada, Hopper and Blackwell have them."""
        return self.capability >= (7, 5)

    @property
    def verdict(self) -> str:
        from engine.int8 import ops  # imports torch: only once a GPU was found

        if not self.int8_pays:
            return f"no INT8 tensor cores ({self.sm}): INT8 saves memory, speed-up unlikely"
        if ops.KERNELS_MISSING:
            return "INT8 tensor cores, but no Triton 3.4+ for the INT8 kernels: INT8 runs on a slower fallback"
        return "INT8 tensor cores: faster than bf16 expected"

    def advice(self, runs: list[dict]) -> Advice | None:
        """The advice of the last benchmark run on this GPU, or None. ``runs``: the Benchmark page's kept
        runs (``Settings.benchmark_results``, oldest first), each with its ``BenchResult.to_dict()``."""
        device = gpu_device(self.name, self.capability)
        kept = next((run["result"] for run in reversed(runs) if run["result"].get("device") == device), None)
        return advise(BenchResult.from_dict(kept)) if kept else None

    def summary(self, runs: list[dict] = ()) -> str:
        advice = self.advice(runs)
        verdict = advice.text if advice else f"{self.verdict} (a guess: not measured yet)"
        return f"{self.name} · {format_bytes(self.vram_bytes)} VRAM · {self.sm} · {verdict}"


def gpus() -> list[Gpu]:
    """The CUDA GPUs torch can see (none on a CPU-only build or machine)."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(Gpu(index, props.name, props.total_memory, (props.major, props.minor)))
    return found


def device(gpu_index: int) -> str | None:
    """The torch device for the chosen GPU, or None (the engine then picks: the GPU when there is one)."""
    return f"cuda:{gpu_index}" if any(g.index == gpu_index for g in gpus()) else None


def selected_gpu(devices: list[Gpu], selected: int = 0) -> Gpu | None:
    """The GPU chosen in the settings, the first one where that one is gone, None without a GPU."""
    return next((g for g in devices if g.index == selected), devices[0] if devices else None)


def gpu_summary(devices: list[Gpu], selected: int = 0, runs: list[dict] = ()) -> str:
    """The chosen GPU in one line (the status bar's, the settings'); ``runs``: as :meth:`Gpu.advice`'s."""
    gpu = selected_gpu(devices, selected)
    return gpu.summary(runs) if gpu else CPU_ONLY


def ram_summary() -> str:
    memory = psutil.virtual_memory()
    return f"RAM {format_bytes(memory.available)} free of {format_bytes(memory.total)}"
