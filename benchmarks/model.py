"""End-to-end step benchmark of full-size models with random weights, and where a step's GPU time goes.

For each ``NAME:RESOLUTION`` it runs :func:`engine.bench.run_bench` (the job behind ``int8-studio
bench``) and prints its table; then, for the first one, profiles one step of bf16 and int8, eager and
compiled, and splits GPU kernel time into linears, attention, activation quantization and the rest
(norms, RoPE, modulation, copies), next to the step's wall time (the difference is time the GPU
waited for the host). Tables go to stdout, JSON to ``--out``. Run on a GPU machine:

    PYTHONPATH=. python3 benchmarks/model.py flux2-klein-9b:1024 zimage-turbo:1024 [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine.bench import DTYPE, SEED, BenchRequest, compile_blocks, run_bench, to_device
from engine.models.build import named_config, quantize_model, random_model

# GPU kernels by name: the first category whose pattern a kernel's name holds takes its time.
CATEGORIES = {
    "quantization": ("_quantize_rows_kernel",),
    "int8 GEMM": ("_scaled_mm_kernel",),
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "bf16 GEMM": ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "ampere_"),
}


def profile_step(name: str, resolution: int, fmt: str) -> dict[str, float]:
    """Milliseconds of GPU time per category for one step of ``fmt``, and the step's wall time."""
    arch, config, _ = named_config(name)
    device = torch.device("cuda")
    model = random_model(arch, config, device, DTYPE, SEED)
    base, _, compiled = fmt.partition("+")
    if base == "int8":
        quantize_model(model, arch)
    if compiled:
        compile_blocks(model)
    inputs = to_device(model.random_inputs(1, resolution, seed=SEED), device)
    with torch.no_grad():
        for _ in range(3):  # compile, autotune, warm up
            model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    shares = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name_ = event.key.lower()
        category = next(
            (c for c, pats in CATEGORIES.items() if any(p.lower() in name_ for p in pats)), "other"
        )
        shares[category] += event.self_device_time_total / 1e3
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {**shares, "GPU total": sum(shares.values()), "wall": wall * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME:RESOLUTION, e.g. flux2-klein-9b:1024")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--formats", default="bf16,bf16+compile,fp8,int8,int8+compile")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in args.runs:
        name, _, resolution = run.partition(":")
        request = BenchRequest(name, int(resolution), args.steps, tuple(args.formats.split(",")))
        result = run_bench(request)
        print(result.table(), "\n", flush=True)
        results.append(result.to_dict())
        (args.out / "model-bench.json").write_text(json.dumps(results, indent=2))
    if args.no_profile:
        return
    name, _, resolution = args.runs[0].partition(":")
    profiles = {
        fmt: profile_step(name, int(resolution), fmt)
        for fmt in ("bf16", "int8", "bf16+compile", "int8+compile")
    }
    (args.out / "model-profile.json").write_text(json.dumps({args.runs[0]: profiles}, indent=2))
    columns = list(next(iter(profiles.values())))
    print(f"GPU time of one step of {args.runs[0]}, ms")
    print("format        " + "".join(f"{c:>14}" for c in columns))
    for fmt, shares in profiles.items():
        print(f"{fmt:<14}" + "".join(f"{shares[c]:>14.1f}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
