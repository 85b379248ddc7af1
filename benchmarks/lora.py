"""LoRA benchmarks: what an unmerged LoRA costs per step, and how far each merge mode is from a float merge.

``speed`` — one denoising step of an int8 model, *merged* vs *dynamic* LoRA. Merged is the int8 model
alone: a merged LoRA changes weights, not the work, so it costs nothing at run time. Dynamic is the
same model with ``--loras`` random rank-``--rank`` LoRAs on every quantized linear layer through
:class:`engine.lora.dynamic.DynamicLoras`. Both run compiled (``torch.compile(fullgraph=True)``); the
dynamic run changes every strength before each timed step and counts recompiles (must stay 0).
Target (issue 5): dynamic ≤ 1.08 × merged for Flux.2 Klein 9B at 1024², rank 32, on an H100.
Random weights (``engine.models.build.random_model``), bf16 activations, row-wise int8 weights::

    PYTHONPATH=. python3 benchmarks/lora.py speed [--model flux2-klein-9b] [--res 1024] [--rank 32]
        [--loras 1] [--steps 10] [--mode max-autotune-no-cudagraphs] [--json results.json]

(a CPU smoke run of the script: ``speed --model flux2-tiny --device cpu --res 128 --steps 2``.)

``merge`` — the merge job end to end on a Flux.2 model with Klein 4B's layer widths (one double and
one single block, heavy-tailed random weights), converted to int8 by ``engine.convert``, and a rank-32
kohya LoRA whose change ‖ΔW‖ is 10%, 2% or 0.5% of ‖W‖ (strength 1, 0.2, 0.05). For each scheme,
change and mode it reports the rms change in int8 steps, the int8 model's own rounding noise (against
its bf16 source) relative to the change, then against the float merge (dequantized int8 + ΔW): the
rms error relative to the change, the fraction of the change kept (projection onto ΔW: 1 = all of it,
on average) and the merge job's time. ``nearest`` — the change added at the existing scale, rounded
to nearest — is the naive mode, computed here for comparison. Runs on the CPU in 8 to 11 minutes
(2 cores); its 6 GB of files go to a temporary folder, removed at the end, unless ``--out`` is given::

    PYTHONPATH=. python3 benchmarks/lora.py merge [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from engine.convert import ConvertRequest, run_convert
from engine.int8.linear import Int8Linear
from engine.int8.quantize import SCHEMES
from engine.lora import MODES, LoraMergeRequest, LoraSpec, run_lora_merge
from engine.lora.dynamic import DynamicLoras, Factors
from engine.models import REGISTRY
from engine.int8.apply import quantize_model
from engine.models.build import named_config, random_model

DTYPE = torch.bfloat16
TARGET = 1.08


def step_seconds(
    model, inputs, steps: int, warmup: int, before_step=lambda: None
) -> tuple[float, torch.Tensor]:
    """Median wall time of one step (the device synchronized), and the last output."""
    sync = torch.cuda.synchronize if next(iter(inputs.values())).is_cuda else lambda: None
    times = []
    with torch.no_grad():
        for n in range(warmup + steps):
            before_step()
            sync()
            start = time.perf_counter()
            out = model(**inputs)
            sync()
            if n >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times), out


def random_loras(
    model: torch.nn.Module, dynamic: DynamicLoras, count: int, rank: int, generator
) -> list[str]:
    """``count`` LoRAs of rank ``rank`` on every Int8Linear, with factors of a trained LoRA's scale."""
    names = []
    device = next(model.parameters()).device
    for n in range(count):
        factors = {}
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear):
                out, inp = module.weight.shape
                down = torch.randn(rank, inp, generator=generator, device=device) / inp**0.5
                up = torch.randn(out, rank, generator=generator, device=device) * 1e-2
                factors[name] = Factors(down, up, torch.ones(rank))
        names.append(dynamic.add_factors(f"lora {n}", factors))
    return names


def speed(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    arch, config, label = named_config(args.model)
    generator = torch.Generator(device).manual_seed(0)
    model = random_model(arch, config, device, DTYPE)
    layers = quantize_model(model, arch, "rowwise")
    # activations in bf16 on the device; timesteps stay float32, position ids integers
    inputs = {
        k: v.to(device, DTYPE) if v.is_floating_point() and v.ndim > 1 else v.to(device)
        for k, v in model.random_inputs(1, args.res).items()
    }
    options = {"mode": args.mode} if args.mode else {}

    def compiled():
        torch._dynamo.reset()
        return torch.compile(model, fullgraph=True, backend=args.backend, **options)

    merged, merged_out = step_seconds(compiled(), inputs, args.steps, warmup=3)

    dynamic = DynamicLoras(model, DTYPE)
    names = random_loras(model, dynamic, args.loras, args.rank, generator)
    strengths = torch.Generator().manual_seed(1)

    def new_strengths() -> None:
        for name in names:
            dynamic.set_strength(name, float(torch.rand((), generator=strengths)) * 2 - 0.5)

    unmerged_model = compiled()
    step_seconds(unmerged_model, inputs, 1, warmup=2)  # compile, and settle
    graphs = counters["stats"]["unique_graphs"]
    unmerged, _ = step_seconds(unmerged_model, inputs, args.steps, warmup=1, before_step=new_strengths)
    recompiles = counters["stats"]["unique_graphs"] - graphs
    for name in names:
        dynamic.set_strength(name, 0.0)
    with torch.no_grad():
        zero = unmerged_model(**inputs)
    drift = ((zero.float() - merged_out.float()).norm() / merged_out.float().norm()).item()

    results = {
        "model": label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "resolution": args.res,
        "rank": args.rank,
        "loras": args.loras,
        "int8_layers": layers,
        "compile": f"{args.backend}" + (f" {args.mode}" if args.mode else ""),
        "merged_ms": merged * 1e3,
        "dynamic_ms": unmerged * 1e3,
        "ratio": unmerged / merged,
        "target": TARGET,
        "recompiles_on_strength_change": recompiles,
        "strength_0_vs_merged_rel_error": drift,
    }
    print(
        f"{label} at {args.res}², {layers} int8 layers, rank {args.rank} × {args.loras} LoRA, "
        f"{results['device']}"
    )
    print(f"  merged   {merged * 1e3:9.2f} ms/step")
    print(f"  dynamic  {unmerged * 1e3:9.2f} ms/step  ×{unmerged / merged:.3f} (target ≤ ×{TARGET})")
    print(f"  recompiles when strengths change: {recompiles}; strength 0 vs merged: {drift:.1e} relative")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


# --- merge error -------------------------------------------------------------------------------------

RANK = 32
CHANGE = 0.10  # ‖ΔW‖ / ‖W‖ at strength 1
STRENGTHS = (1.0, 0.2, 0.05)  # changes of 10%, 2% and 0.5% of the weights' norm


def heavy_tailed(shape: tuple[int, int]) -> torch.Tensor:
    """Weights with std 1/√in and Student-t(5) tails, so that absmax sits far above the std as in
    trained weights (it sets the int8 step). Drawn as z / √(χ²₅ / 5) with χ²₅ = z'² − 2 ln(u·u')
    (χ²₁ + χ²₄): several times faster than torch's gamma sampler."""
    chi2 = torch.rand(shape).mul_(torch.rand(shape)).log_().mul_(-2).add_(torch.randn(shape).square_())
    t = torch.randn(shape).div_(chi2.div_(5).sqrt_())
    return (t * (3 / 5) ** 0.5 / shape[1] ** 0.5).to(torch.bfloat16)


def filler(shape: tuple[int, ...]) -> torch.Tensor:
    """The layers kept in high precision: plain normal values (norm scales near 1), quick to draw; they
    only complete the model's layout."""
    t = 0.02 * torch.randn(shape)
    return (t + 1 if len(shape) == 1 else t).to(torch.bfloat16)


def merge(args: argparse.Namespace) -> None:
    with nullcontext(args.out) if args.out else tempfile.TemporaryDirectory(prefix="lora-merge-") as out:
        merge_errors(Path(out))


def merge_errors(folder: Path) -> None:
    """Build the model and the LoRA in ``folder``, merge in every scheme, size and mode, print the table."""
    arch = REGISTRY["flux2"]
    config = {**arch.variants["Klein 4B"], "double_blocks": 1, "single_blocks": 1}
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shapes = arch.tensor_shapes(config)
    targets = [n for n, s in shapes.items() if not arch.keeps_high_precision(n, s)]
    weights = {n: heavy_tailed(s) if n in targets else filler(s) for n, s in shapes.items()}
    source = folder / "model-bf16.safetensors"
    save_file(weights, str(source))
    lora, deltas = {}, {}
    for name in targets:
        out, inp = shapes[name]
        down = torch.randn(RANK, inp) / inp**0.5
        up = torch.randn(out, RANK)
        up *= CHANGE * weights[name].float().norm() / (up @ down).norm()
        deltas[name] = up @ down
        stem = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        lora |= {f"{stem}.lora_down.weight": down.contiguous(), f"{stem}.lora_up.weight": up.contiguous()}
    lora_path = folder / "lora.safetensors"
    save_file(lora, str(lora_path))
    print(
        f"Flux.2, Klein 4B widths, {len(targets)} int8 layers "
        f"({sum(math.prod(shapes[n]) for n in targets) / 1e6:.0f}M weights), rank {RANK} LoRA, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| scheme | ‖ΔW‖/‖W‖ | rms Δ / step | int8 noise / Δ | mode | error / Δ | Δ kept | merge time |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme in SCHEMES:
        converted = folder / f"model-{scheme}.safetensors"
        int8 = run_convert(ConvertRequest(source, converted, scheme, overwrite=True)).output
        base = load_file(str(int8))
        size, noise = context(base, weights, deltas)
        for strength in STRENGTHS:
            rows = {}
            for mode in MODES:
                spec, target = LoraSpec(lora_path, strength), folder / f"{scheme}-{mode}.safetensors"
                request = LoraMergeRequest(int8, (spec,), target, mode, overwrite=True)
                started = time.perf_counter()
                merged = load_file(str(run_lora_merge(request).output))
                rows[mode] = (
                    errors(merged, base, deltas, strength),
                    f"{time.perf_counter() - started:.0f} s",
                )
            rows["nearest"] = (errors(nearest(base, deltas, strength), base, deltas, strength), "")
            for mode, ((error, kept), seconds) in rows.items():
                print(
                    f"| {scheme} | {strength * CHANGE:.1%} | {size * strength:.2f} | {noise / strength:.2f} "
                    f"| {mode} | {error:.2f} | {kept:.2f} | {seconds} |"
                )


def dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return tensors[name].float().mul_(step(tensors, name))


def step(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The int8 step of a layer: a scalar (tensor-wise) or an [out, 1] column (row-wise)."""
    scale = tensors[name.removesuffix(".weight") + ".weight_scale"].float()
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)


def context(base, weights, deltas) -> tuple[float, float]:
    """At strength 1, over all layers: (rms change in int8 steps, rms error of the int8 model against its
    bf16 source / rms change). The first scales with the strength, the second with its inverse."""
    change2 = steps2 = noise2 = 0.0
    for name, delta in deltas.items():
        change2 += float(delta.square().sum())
        steps2 += float((delta / step(base, name)).square_().sum())
        noise2 += float(dequantized(base, name).sub_(weights[name].float()).square_().sum())
    count = sum(d.numel() for d in deltas.values())
    return (steps2 / count) ** 0.5, (noise2 / change2) ** 0.5


def nearest(
    base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], strength: float
) -> dict[str, torch.Tensor]:
    """The naive merge: the change added in the int8 grid at the existing scale, rounded to nearest."""
    out = dict(base)
    for name, delta in deltas.items():
        moved = (delta * (strength / step(base, name))).round_().add_(base[name])
        out[name] = moved.clamp_(-127, 127).to(torch.int8)
    return out


def errors(merged, base, deltas, strength) -> tuple[float, float]:
    """Against the float merge (the int8 model dequantized + the change), over all layers: (rms error /
    rms change, the fraction of the change kept: the merged change projected onto the float one)."""
    err2 = change2 = kept = 0.0  # torch's sums, not dot products: those accumulate in float32
    for name, delta in deltas.items():
        moved = dequantized(merged, name).sub_(dequantized(base, name))
        kept += strength * float((moved * delta).sum())
        change2 += strength**2 * float(delta.square().sum())
        err2 += float(moved.sub_(delta, alpha=strength).square_().sum())
    return (err2 / change2) ** 0.5, kept / change2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="step time: merged vs dynamic LoRA (GPU)")
    p.add_argument("--model", default="flux2-klein-9b", help="a known model name (random weights)")
    p.add_argument("--res", type=int, default=1024, help="image side in pixels")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--loras", type=int, default=1, help="LoRAs applied at once")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warm-up steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument(
        "--mode", default=None, help="torch.compile mode (inductor), e.g. max-autotune-no-cudagraphs"
    )
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=speed)
    p = sub.add_parser("merge", help="each merge mode's error against a float merge (CPU)")
    p.add_argument("--out", help="folder for the files (default: a new temporary folder)")
    p.set_defaults(func=merge)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
