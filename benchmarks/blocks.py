"""Per repeated block of one step: how long the host takes to enqueue it against its GPU time.

The torch profiler's own host costs make int8 steps look host-bound (gaps before every GEMM); this
measures without it: CUDA events around each block and the host clock around the same call. A block
whose host time approaches its GPU time leaves the GPU waiting. Also the GPU time between blocks,
before the first and after the last. Run on a GPU machine:

    PYTHONPATH=. python3 benchmarks/blocks.py flux2-klein-9b 1024 int8+compile bf16+compile int8
"""

from __future__ import annotations

import itertools
import sys
import time

import torch
from torch import nn

from engine.bench import SEED
from engine.bench_measure import DTYPE, compile_blocks, to_device
from engine.int8.apply import quantize_model
from engine.models.build import named_config, random_model


class Timed(nn.Module):
    """Runs ``block`` between two CUDA events and appends (kind, host seconds, start, end) to ``records``."""

    def __init__(self, block: nn.Module, kind: str, records: list) -> None:
        super().__init__()
        self.block, self.kind, self.records = block, kind, records

    def forward(self, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        out = self.block(*args, **kwargs)
        end.record()
        self.records.append((self.kind, time.perf_counter() - host, start, end))
        return out


def measure(name: str, resolution: int, fmt: str, repeats: int = 3) -> list[str]:
    arch, config, _ = named_config(name)
    device = torch.device("cuda")
    model = random_model(arch, config, device, DTYPE, SEED)
    if fmt.startswith("int8"):
        quantize_model(model, arch)
    if fmt.endswith("+compile"):
        compile_blocks(model)
    records: list = []
    for kind, blocks in model.named_children():
        if isinstance(blocks, nn.ModuleList):
            for i, block in enumerate(blocks):
                blocks[i] = Timed(block, kind, records)
    inputs = to_device(model.random_inputs(1, resolution, seed=SEED), device)
    lines = []
    with torch.no_grad():
        for _ in range(4):  # compile, tune, warm up
            model(**inputs)
        torch.cuda.synchronize()
        for _ in range(repeats):
            records.clear()
            step_start, step_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            host = time.perf_counter()
            step_start.record()
            model(**inputs)
            step_end.record()
            enqueue = time.perf_counter() - host
            torch.cuda.synchronize()
            wall = time.perf_counter() - host
            kinds: dict[str, list[float]] = {}
            between = sum(a[3].elapsed_time(b[2]) for a, b in itertools.pairwise(records))
            for kind, seconds, start, end in records:
                n, host_ms, gpu_ms = kinds.get(kind, (0, 0.0, 0.0))
                kinds[kind] = [n + 1, host_ms + seconds * 1e3, gpu_ms + start.elapsed_time(end)]
            per_kind = ", ".join(f"{k}: {n}× host {h / n:.2f} / GPU {g / n:.2f} ms" for k, (n, h, g) in kinds.items())
            lines.append(
                f"{name}:{resolution} {fmt}: wall {wall * 1e3:.1f} ms, enqueued in {enqueue * 1e3:.1f} ms; "
                f"GPU before the first block {step_start.elapsed_time(records[0][2]):.2f} ms, between blocks "
                f"{between:.2f} ms, after the last {records[-1][3].elapsed_time(step_end):.2f} ms; {per_kind}"
            )
            print(lines[-1], flush=True)
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return lines


if __name__ == "__main__":
    for fmt in sys.argv[3:]:
        measure(sys.argv[1], int(sys.argv[2]), fmt)
