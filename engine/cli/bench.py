"""`bench`: seconds per step of a model in each weight format (the job is :mod:`engine.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.cli.commands import command
from engine.cli.progress import ProgressBar

if TYPE_CHECKING:  # torch and Triton: only when `bench` runs
    from engine.bench import BenchRequest


@command("bench", help="seconds per step of a model in bf16, fp8 and int8, with each format's quality cost")
def _bench_command(p: argparse.ArgumentParser) -> None:
    from engine.bench import FORMATS, bench_defaults  # torch and Triton: only when `bench` is asked for
    from engine.int8.choices import ATTENTION_HELP, ATTENTIONS, DEFAULT_SCHEME, ROTATION_POLICIES, SCHEMES

    gpu, cpu = bench_defaults(gpu=True), bench_defaults(gpu=False)
    p.add_argument(
        "source", nargs="?",
        help="a checkpoint, or a model name with random weights: flux2-klein-9b, flux1-dev, zimage-turbo, …; "
        f"default: {gpu.source} on a GPU, {cpu.source} on the CPU. On the CPU every run is a quick one "
        "unless --res, --steps and --formats ask for more. Families INT8 Studio's engine does not run "
        "(Wan) are converted here and run in ComfyUI with INT8 Studio's node pack",
    )  # fmt: skip
    p.add_argument(
        "--res", type=int, help=f"image side in pixels (default {gpu.resolution}; on the CPU {cpu.resolution})"
    )
    p.add_argument(
        "--steps", type=int,
        help=f"timed steps per format, after warm-up (default {gpu.steps}; on the CPU {cpu.steps})",
    )  # fmt: skip
    p.add_argument(
        "--formats", type=lambda text: tuple(text.split(",")),
        help=f"comma-separated, from {','.join(FORMATS)} (default: all; on the CPU {','.join(cpu.formats)})",
    )  # fmt: skip
    p.add_argument(
        "--scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
        help=f"int8 weight scales: one per output row or per weight (default: {DEFAULT_SCHEME})",
    )
    p.add_argument(
        "--rotate", choices=ROTATION_POLICIES, default="none",
        help="int8 formats of a float model: Hadamard-rotate no layer, the down-projections or all",
    )  # fmt: skip
    p.add_argument(
        "--attention", choices=ATTENTIONS,
        help=f"the int8 formats' attention, overriding an int8 file's (convert --attention): {ATTENTION_HELP}",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    p.add_argument(
        "--text-tokens", type=int, help="prompt length in tokens (default: the model's typical one)"
    )
    p.add_argument(
        "--device", metavar="{cpu,cuda,cuda:N}", help="default: cuda (the first GPU) when there is a GPU"
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time replays of a CUDA graph of each step: GPU time, no launch costs",
    )
    p.add_argument(
        "--max-vram",
        type=float,
        metavar="GB",
        help="run as a GPU with this much memory would: formats that do not fit are reported as such",
    )
    p.add_argument(
        "--advise", action="store_true",
        help="end with which format to run on this GPU and model, from the numbers just measured",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (--advise: an advice field)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from engine.advice import advise
    from engine.bench import bench_defaults, run_bench

    gpu = args.device != "cpu" and torch.cuda.is_available()
    defaults = bench_defaults(gpu)  # what the app's form starts from on this machine
    request = replace(defaults, source=args.source) if args.source else defaults
    chosen = {"resolution": args.res, "steps": args.steps, "formats": args.formats}
    request = replace(
        request, **{k: v for k, v in chosen.items() if v is not None}, scheme=args.scheme, batch=args.batch,
        text_tokens=args.text_tokens, device=args.device, cuda_graphs=args.cuda_graphs, rotate=args.rotate,
        max_vram_gb=args.max_vram, attention=args.attention,
    )  # fmt: skip
    with ProgressBar() as bar:
        result = run_bench(request, progress=bar)
    advice = advise(result) if args.advise else None
    if args.json:
        print(json.dumps(result.to_dict() | ({"advice": advice.to_dict()} if advice else {}), indent=2))
    else:
        print("\n\n".join([result.table(), *(["\n".join(advice.lines())] if advice else [])]))
    if not gpu and None in chosen.values():
        print(f"int8-studio: {quick_run(request)}", file=sys.stderr)
    return 0


def quick_run(r: BenchRequest) -> str:
    """What a CPU run measured when not told otherwise, and how to ask for more."""
    return (
        f"on the CPU, a quick run: {r.resolution}×{r.resolution}, {r.steps} steps, {','.join(r.formats)}; "
        "ask for more with --res, --steps and --formats"
    )
