"""Hadamard rotation on the GPU: what it costs and what it buys.

1. The activation quantization kernel with and without the fused rotation, on rows of Flux/Z-Image
   widths (M = 4608, the tokens of a 1024² image + prompt), and rotating in PyTorch first.
2. For each ``NAME:RESOLUTION``: ``int8-studio bench``'s job once per rotation policy (none, down,
   all): seconds per step and output error against bf16, eager and compiled.

    PYTHONPATH=. python3 benchmarks/rotation.py flux2-klein-9b:1024 [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton.testing

from engine.bench import BenchRequest, run_bench
from engine.int8 import kernels
from engine.int8.choices import ROTATION_POLICIES
from engine.int8.rotation import hadamard, rotate

WIDTHS = (3072, 4096, 12288, 16384)
TOKENS = 4608


def kernel_times() -> list[dict]:
    """µs per call of each way to quantize [TOKENS, K] bf16 rows, and the DRAM rate of the fused one."""
    rows = []
    for k in WIDTHS:
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
        h16 = hadamard(16, "cuda", x.dtype)
        calls = {
            "plain": lambda x=x: kernels.quantize_tokens(x),
            "fused rotation": lambda x=x, h16=h16: kernels.quantize_rotated_tokens(x, h16),
            "rotate in PyTorch, then quantize": lambda x=x: kernels.quantize_tokens(rotate(x, 256)),
        }
        times = {name: triton.testing.do_bench(call) for name, call in calls.items()}
        moved = x.numel() * 3  # read bf16, write int8
        rows.append({"K": k, **{name: ms * 1e3 for name, ms in times.items()},
                     "fused GB/s": moved / (times["fused rotation"] * 1e-3) / 1e9})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="NAME:RESOLUTION, e.g. flux2-klein-9b:1024")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"kernels": kernel_times(), "models": []}
    print(f"Activation quantization of [{TOKENS}, K] bf16, µs per call")
    for row in report["kernels"]:
        print("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    (args.out / "rotation.json").write_text(json.dumps(report, indent=2))
    for run in args.runs:
        name, _, resolution = run.partition(":")
        for policy in ROTATION_POLICIES:
            formats = ("bf16", "bf16+compile", "int8", "int8+compile") if policy == "none" else ("int8", "int8+compile")
            result = run_bench(BenchRequest(name, int(resolution), args.steps, formats, rotate=policy))
            print(result.table(), "\n", flush=True)
            report["models"].append(result.to_dict())
            (args.out / "rotation.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
