"""`convert`, `inspect` and `demo`: a checkpoint converted to INT8, and what a checkpoint holds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli.commands import add_overwrite, command
from engine.cli.progress import ProgressBar
from engine.int8.choices import (
    ATTENTION_HELP,
    ATTENTIONS,
    DEFAULT_ATTENTION,
    DEFAULT_SCHEME,
    ROTATION_POLICIES,
    SCHEMES,
)
from engine.units import format_bytes

if TYPE_CHECKING:  # the jobs import torch: each command imports its own when it runs
    from engine.convert import ConvertResult
    from engine.info import CheckpointInfo


@command("convert", help="convert a checkpoint (single file or diffusers folder) to an INT8 file")
def _convert_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help=".safetensors file, diffusers model folder or its index json")
    p.add_argument("-o", "--output", type=Path, help="default: <source>-int8-<scheme>.safetensors beside it")
    p.add_argument(
        "--scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
        help=f"int8 weight scales: rowwise = one per output row, tensorwise = one per weight (default: "
        f"{DEFAULT_SCHEME}, the lower error, for a few KB per layer)",
    )  # fmt: skip
    p.add_argument(
        "--rotate", choices=ROTATION_POLICIES, default="none",
        help="Hadamard-rotate no layer, the down-projections or every layer: lower int8 error, a few %% "
        "slower; the file then needs a ComfyUI that reads the 'convrot' marker",
    )  # fmt: skip
    p.add_argument(
        "--attention", choices=ATTENTIONS, default=DEFAULT_ATTENTION,
        help=f"recorded in the file for INT8 Studio's engine (bench): {ATTENTION_HELP}",
    )  # fmt: skip
    p.add_argument(
        "--keep", action="extend", type=comma_separated, default=[], metavar="PATTERN[,PATTERN...]",
        help="keep these in high precision too (glob; repeat the option or separate with commas)",
    )  # fmt: skip
    p.add_argument(
        "--cast-float32", action="store_true",
        help="write the float32 tensors that stay in high precision as bf16 (default: keep them float32)",
    )  # fmt: skip
    add_overwrite(p)
    p.set_defaults(func=_run_convert)


def comma_separated(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``; blanks around and between the commas are dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _run_convert(args: argparse.Namespace) -> int:
    from engine.convert import ConvertRequest, run_convert

    request = ConvertRequest(
        args.source, args.output, args.scheme, tuple(args.keep),
        cast_float32_to_bf16=args.cast_float32, overwrite=args.overwrite, rotate=args.rotate,
        attention=args.attention,
    )  # fmt: skip
    with ProgressBar() as bar:
        result = run_convert(request, progress=bar)
    print(_converted(result))
    return 0


def _converted(r: ConvertResult) -> str:
    left_out = f"; left out {r.left_out} tensors outside the diffusion model" if r.left_out else ""
    rotated = f" ({r.rotated} Hadamard-rotated)" if r.rotated else ""
    return (
        f"wrote {r.output}: {r.model}, {r.quantized} layers int8 {r.scheme}{rotated}, "
        f"{r.kept} tensors kept{left_out}; "
        f"{format_bytes(r.bytes_in)} → {format_bytes(r.bytes_out)} in {r.seconds:.1f} s"
    )


@command("inspect", help="show what a checkpoint holds: model, layout, dtypes, quantization, metadata")
def _inspect_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help=".safetensors file, diffusers model folder or its index json")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from engine.info import inspect_checkpoint

    info = inspect_checkpoint(args.file)
    print(info.to_json() if args.json else describe(info))
    return 0


def describe(info: CheckpointInfo, value_width: int = 100) -> str:
    """``inspect``'s readable report, one fact per line."""
    files = f"{len(info.files)} files" if len(info.files) > 1 else "1 file"
    lines = [f"file         {info.path} ({format_bytes(info.size)}, {files}, {info.tensors} tensors)"]
    if info.model:
        prefix = f", prefix '{info.prefix}'" if info.prefix else ""
        lines.append(f"model        {info.model} ({info.architecture}), {info.layout} layout{prefix}")
        quantized = ", ".join(f"{n} layers {fmt}" for fmt, n in info.quantized_layers.items())
        lines.append(f"weights      {info.weight_format}" + (f" ({quantized})" if quantized else ""))
        if info.other_tensors:
            lines.append(f"             {info.other_tensors} tensors outside the diffusion model")
    else:
        lines.append(f"model        none recognised: {info.problem}")
    dtypes = ", ".join(f"{d} {c.tensors} ({format_bytes(c.bytes)})" for d, c in info.dtypes.items())
    lines.append(f"dtypes       {dtypes}")
    if info.markers or info.metadata_layers is not None:
        markers = ", ".join(f"{n} × {text}" for text, n in info.markers.items()) or "none"
        lines.append(f"comfy_quant  {markers}")
        if info.metadata_layers is not None:
            bad = info.marker_mismatches
            agree = f"disagrees on {len(bad)} layers, e.g. {bad[0]}" if bad else "agrees"
            lines.append(f"{'':12} _quantization_metadata lists {info.metadata_layers} layers and {agree}")
    for n, (key, value) in enumerate(sorted(info.metadata.items())):
        if key == "_quantization_metadata":
            value = f"({len(value)} characters)"
        value = value if len(value) <= value_width else value[: value_width - 1] + "…"
        lines.append(f"{'metadata' if n == 0 else '':<12} {key} = {value}")
    return "\n".join(lines)


@command("models", help="list the model families INT8 Studio converts, their variants, and the ones it runs itself")
def _models_command(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    print(models_table())
    return 0


def models_table() -> str:
    """``models``' table: per family its variants and the names ``bench`` runs it by (random weights)."""
    from engine.models import REGISTRY
    from engine.models.build import model_names  # torch: only when the command runs

    known = model_names()
    rows = [("family", "variants", "int8-studio bench names (random weights)")]
    for arch in REGISTRY.values():
        names = [name for name, (named, _) in known.items() if named is arch]
        rows.append((arch.label, ", ".join(arch.variants), ", ".join(names) or "none: converted, not run here"))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{family:{widths[0]}}  {variants:{widths[1]}}  {names}" for family, variants, names in rows]
    return "\n".join([*lines, "every family: convert, inspect and lora merge"])


@command("demo", help="build the built-in demo model and its LoRA, convert the model to INT8 and inspect it")
def _demo_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", type=Path, help="where to put the demo files (default: user cache folder)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from engine.convert import ConvertRequest, run_convert
    from engine.demo import build_demo_lora, build_demo_model
    from engine.info import inspect_checkpoint

    with ProgressBar() as bar:  # each bar ends its line before anything is printed
        model = build_demo_model(args.folder, progress=bar)
    print(f"demo model: {model} ({format_bytes(model.stat().st_size)})")
    with ProgressBar() as bar:
        lora = build_demo_lora(args.folder, progress=bar)
    print(f"demo LoRA: {lora} ({format_bytes(lora.stat().st_size)})")
    with ProgressBar() as bar:
        result = run_convert(ConvertRequest(model, overwrite=True), progress=bar)
    print(_converted(result))
    print(describe(inspect_checkpoint(result.output)))
    print(f"next, merge the demo LoRA: int8-studio lora merge {result.output} {lora}")
    return 0
