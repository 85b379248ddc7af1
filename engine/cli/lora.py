"""`lora merge` and `lora inspect`: LoRAs merged into a model, and what a LoRA file is."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli.commands import add_overwrite, command
from engine.cli.progress import ProgressBar
from engine.units import format_bytes

if TYPE_CHECKING:  # engine.lora imports torch: each command imports it when it runs
    from engine.lora import LoraInfo, LoraSpec, MergeStats


@command("lora", help="merge LoRAs into a model (INT8 or float), or show what a LoRA file is")
def _lora_command(p: argparse.ArgumentParser) -> None:
    from engine.lora import MODES

    sub = p.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    merge = sub.add_parser("merge", help="merge LoRAs into a model and write a new file of the same format")
    merge.add_argument("model", type=Path, help="the model: INT8 or float .safetensors, or a diffusers folder")
    merge.add_argument(
        "loras", nargs="+", type=lora_spec, metavar="LORA[:STRENGTH]", help="LoRA files, strength 1 by default"
    )
    merge.add_argument(
        "-o", "--output", type=Path, help="the merged model's file (default: <model>-<lora>.safetensors beside it)"
    )
    merge.add_argument(
        "--mode", choices=MODES, default="auto",
        help="int8 weights: auto (default, recommended) = requant where that keeps the LoRAs' change, "
        "stochastic where the change is smaller than the int8 step; requant = fresh scales, round to "
        "nearest: lowest error for large changes but drops changes under half an int8 step (most "
        "LoRAs on tensor-wise models); stochastic = existing scales, unbiased rounding keeps small "
        "changes on average at the cost of noise, untouched values stay bit-identical",
    )  # fmt: skip
    merge.add_argument(
        "--seed", type=int, default=0, help="stochastic rounding: the same seed gives the same file"
    )
    add_overwrite(merge)
    merge.set_defaults(func=_run_lora_merge)
    inspect = sub.add_parser("inspect", help="format, rank, target architecture and key coverage of a LoRA")
    inspect.add_argument("lora", type=Path, help="the LoRA .safetensors file")
    inspect.add_argument("--model", type=Path, help="measure coverage on this model (default: the best guess)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=_run_lora_inspect)


def lora_spec(text: str) -> LoraSpec:
    """``style.safetensors:0.8`` → (path, 0.8); a colon not followed by a number is part of the path."""
    from engine.lora import LoraSpec

    path, colon, strength = text.rpartition(":")
    try:
        return LoraSpec(Path(path), float(strength)) if colon and path else LoraSpec(Path(text))
    except ValueError:
        if path.endswith(".safetensors"):
            raise argparse.ArgumentTypeError(f"strength {strength!r} of {path} is not a number") from None
        return LoraSpec(Path(text))


def _run_lora_merge(args: argparse.Namespace) -> int:
    from engine.lora import LoraMergeRequest, run_lora_merge

    request = LoraMergeRequest(args.model, tuple(args.loras), args.output, args.mode, args.seed, args.overwrite)
    with ProgressBar() as bar:
        r = run_lora_merge(request, progress=bar)
    loras = f"{len(r.matches)} LoRA{'s' if len(r.matches) > 1 else ''}"
    print(f"wrote {r.output}: {r.model} + {loras}, {r.tensors_changed} tensors changed")
    if r.stats.layers:
        print(f"  {describe_int8_merge(args.mode, r.stats)}")
    for spec, m in zip(request.loras, r.matches):
        skipped = f"; {len(m.text_encoder)} text-encoder keys skipped" if m.text_encoder else ""
        unmatched = f"; {len(m.unmatched)} keys match no layer, e.g. {m.unmatched[0]}" if m.unmatched else ""
        ranks = "/".join(map(str, m.lora.ranks)) or "-"
        print(f"  {m.lora.name} × {spec.strength:g}: {m.format}, rank {ranks}, {m.layers} layers{unmatched}{skipped}")
    for warning in r.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def describe_int8_merge(mode: str, stats: MergeStats) -> str:
    """``auto: 10 int8 weights (7 requant, 3 stochastic), change kept 99%, rms error …``."""
    used = ", ".join(f"{n} {m}" for m, n in sorted(stats.modes.items()))
    clipped = f", {stats.clipped} values clipped at ±127" if "stochastic" in stats.modes else ""
    return (
        f"{mode}: {stats.layers} int8 weights{f' ({used})' if mode == 'auto' else ''}, "
        f"change kept {stats.kept:.0%}, rms error vs the float merge {stats.relative_error:.2%} "
        f"of the LoRAs' change{clipped}"
    )


def _run_lora_inspect(args: argparse.Namespace) -> int:
    from engine.lora import inspect_lora

    info = inspect_lora(args.lora, args.model)
    print(info.to_json() if args.json else describe_lora(info))
    return 0


def describe_lora(info: LoraInfo) -> str:
    """``lora inspect``'s readable report, one fact per line."""
    scales = ", ".join(f"{s:g}" for s in info.scales)
    lines = [
        f"file      {info.path} ({format_bytes(info.size)}, {info.tensors} tensors)",
        f"format    {info.format}, {info.layers} layers",
        f"rank      {'/'.join(map(str, info.ranks)) or '-'}" + (f" (alpha/rank {scales})" if scales else ""),
    ]
    if info.target is None:
        lines.append("target    none of the supported architectures")
    else:
        fit = "" if info.fits else " (names match, shapes do not)"
        lines.append(f"target    {info.target}{fit}")
        total = info.matched_keys + len(info.unmatched) + info.text_encoder
        lines.append(
            f"coverage  {info.matched_keys} of {total} keys matched; adapts {info.target_layers} of the model's "
            f"{info.target_linears} linear layers"
        )
    if info.text_encoder:
        lines.append(f"          {info.text_encoder} text-encoder keys (not part of the diffusion model)")
    if info.unmatched:
        lines.append(f"          {len(info.unmatched)} keys match no layer, e.g. {info.unmatched[0]}")
    return "\n".join(lines)
