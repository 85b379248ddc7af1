"""End-to-end step benchmark of full-size models with random weights, and where a step's GPU time goes.

For each ``NAME:RESOLUTION`` it runs :func:`engine.bench.run_bench` (the job behind ``int8-studio
bench``) and prints its table. Then, for each run to profile (default: the first), it measures the
output error of bf16, int8 and fp8 variants against float32 with the same weights (where the error
comes from), and profiles one step of bf16 and int8, eager and compiled, splitting GPU kernel time
into linears, attention, activation quantization and the rest (norms, RoPE, modulation, copies), next
to the step's wall time (the difference is time the GPU waited for the host). Tables go to stdout,
JSON to ``--out``. Run on a GPU machine:

    PYTHONPATH=. python3 benchmarks/model.py flux2-klein-9b:1024 zimage-turbo:1024 \
        [--steps N] [--profile flux2-klein-9b:1024 ...] [--out DIR]

The error budget alone runs anywhere, on full-width models with fewer blocks on a CPU:

    PYTHONPATH=. python3 benchmarks/model.py flux2-klein-4b:256 --errors-only --device cpu \
        --depth double_blocks=1,single_blocks=2
"""

from __future__ import annotations

import argparse
import json
import time
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine.bench import SEED, BenchRequest, run_bench
from engine.bench_measure import DTYPE, Fp8Linear, compile_blocks, to_device
from engine.int8.linear import Int8Linear
from engine.int8.apply import quantize_model
from engine.models.build import named_config, random_model, replace_linears

# GPU kernels by name: the first category whose pattern a kernel's name holds takes its time.
CATEGORIES = {
    "quantization": ("_quantize_tokens_kernel", "_quantize_rotated_tokens_kernel"),
    "int8 GEMM": ("_scaled_mm_kernel",),
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "bf16 GEMM": ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "ampere_"),
}


TOP_KERNELS = 15
PROFILED_FORMATS = ("bf16", "int8", "bf16+compile", "int8+compile")
"""The formats ``--formats`` selects for the profile (fp8 is timed, not profiled)."""


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
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    print(f"top kernels of one {fmt} step (ms, calls):")
    for e in kernels[:TOP_KERNELS]:
        print(f"  {e.self_device_time_total / 1e3:7.2f} {e.count:5d}  {e.key[:110]}")
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name_ = event.key.lower()
        category = next(
            (c for c, pats in CATEGORIES.items() if any(p.lower() in name_ for p in pats)), "other"
        )
        if name_.startswith("triton_"):  # inductor's kernels name the ops they fuse, attention included
            category = "other"
        shares[category] += event.self_device_time_total / 1e3
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {**shares, "GPU total": sum(shares.values()), "wall": wall * 1e3}


def error_budget(
    name: str, resolution: int, device: torch.device, depth: dict[str, int] | None = None
) -> dict[str, dict[str, float]]:
    """Relative error of the output against float32 with the same (bf16) weights, and against bf16,
    for bf16 and for variants of int8 and fp8: where the quantization error comes from. ``depth``
    overrides block counts (a full-width model with fewer blocks fits a CPU); fp8 needs CUDA."""
    arch, config, _ = named_config(name)
    config = {**config, **(depth or {})}
    variants = {
        "bf16": lambda m: m,
        "int8 rowwise": lambda m: quantize_model(m, arch, "rowwise"),
        "int8 tensorwise": lambda m: quantize_model(m, arch, "tensorwise"),
        "int8 rowwise, down-projections bf16": lambda m: replace_linears(m, arch, keep_down_projections(arch)),
        "int8 rowwise, down-projections rotated": lambda m: quantize_model(m, arch, "rowwise", "down"),
        "int8 rowwise, all rotated": lambda m: quantize_model(m, arch, "rowwise", "all"),
        "fp8 rowwise": lambda m: replace_linears(m, arch, lambda _, linear: Fp8Linear(linear)),
    }
    if device.type != "cuda":
        del variants["fp8 rowwise"]
    model = random_model(arch, config, device, DTYPE, SEED)
    inputs = model.random_inputs(1, resolution, seed=SEED)
    with torch.no_grad():
        exact = model.float()(**{k: v.to(device) for k, v in inputs.items()}).float()
    del model
    outputs = {}
    for variant, transform in variants.items():
        model = random_model(arch, config, device, DTYPE, SEED)
        transform(model)
        with torch.no_grad():
            outputs[variant] = model(**to_device(inputs, device)).float()
        del model
        torch.cuda.empty_cache()

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    return {
        v: {"vs float32": error(out, exact), "vs bf16": error(out, outputs["bf16"])}
        for v, out in outputs.items()
    }


def keep_down_projections(arch):
    """``replace_linears`` maker that quantizes every eligible layer except the down-projections
    (the layers whose inputs, SwiGLU/GELU outputs, have the heaviest tails)."""

    def make(name: str, linear: torch.nn.Linear) -> torch.nn.Module:
        if any(fnmatchcase(name, p) for p in arch.down_projections):
            return linear
        return Int8Linear.from_float(linear, "rowwise")

    return make


def depth_overrides(text: str) -> dict[str, int]:
    """``"double_blocks=1,single_blocks=2"`` → ``{"double_blocks": 1, "single_blocks": 2}``."""
    pairs = (item.split("=") for item in text.split(",") if item)
    return {key.strip(): int(value) for key, value in pairs}


def print_errors(run: str, budget: dict[str, dict[str, float]]) -> None:
    print(f"Relative error of the output of {run}")
    for variant, errors in budget.items():
        print(f"{variant:<40}" + "".join(f"{k} {v:7.2%}   " for k, v in errors.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME:RESOLUTION, e.g. flux2-klein-9b:1024")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--formats", default="bf16,bf16+compile,fp8,int8,int8+compile")
    parser.add_argument(
        "--profile", nargs="*", default=None, help="NAME:RESOLUTION to profile (default: the first run)"
    )
    parser.add_argument("--no-errors", action="store_true", help="profile without the error budget")
    parser.add_argument(
        "--errors-only", action="store_true", help="only the error budget of each run (no timing, no profile)"
    )
    parser.add_argument("--device", default="cuda", help="where --errors-only runs (cpu: use --depth)")
    parser.add_argument(
        "--depth", type=depth_overrides, default={}, metavar="KEY=N[,KEY=N]",
        help="block counts for --errors-only, e.g. double_blocks=1,single_blocks=2",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.errors_only:
        for run in args.runs:
            name, _, resolution = run.partition(":")
            budget = error_budget(name, int(resolution), torch.device(args.device), args.depth)
            (args.out / f"model-errors-{name}-{resolution}.json").write_text(json.dumps(budget, indent=2))
            print_errors(run, budget)
        return
    results = []
    for run in args.runs:
        name, _, resolution = run.partition(":")
        request = BenchRequest(name, int(resolution), args.steps, tuple(args.formats.split(",")))
        result = run_bench(request)
        print(result.table(), "\n", flush=True)
        results.append(result.to_dict())
        (args.out / "model-bench.json").write_text(json.dumps(results, indent=2))
    profiled = args.runs[:1] if args.profile is None else args.profile
    for run in profiled:
        name, _, resolution = run.partition(":")
        budget = {} if args.no_errors else error_budget(name, int(resolution), torch.device("cuda"))
        formats = [f for f in args.formats.split(",") if f in PROFILED_FORMATS]
        profiles = {fmt: profile_step(name, int(resolution), fmt) for fmt in formats}
        (args.out / f"model-profile-{name}-{resolution}.json").write_text(
            json.dumps({"errors": budget, "profile": profiles}, indent=2)
        )
        print_errors(run, budget)
        columns = list(next(iter(profiles.values()), {}))
        print(f"GPU time of one step of {run}, ms")
        print("format        " + "".join(f"{c:>14}" for c in columns))
        for fmt, shares in profiles.items():
            print(f"{fmt:<14}" + "".join(f"{shares[c]:>14.1f}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
