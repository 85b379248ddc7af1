"""`int8-studio`: the command-line face of the engine. With no arguments it opens the desktop app.

Exit status: 0 success, 2 bad input or user error (one line on stderr), 1 internal error,
130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TextIO

import torch

from engine import __version__
from engine.bench import FORMATS, BenchRequest, bench_defaults, run_bench
from engine.checkpoint import format_bytes
from engine.comfyui import (
    EXPORT_KINDS,
    ComfyInstall,
    ComfyUIError,
    ExportRequest,
    ExportResult,
    find_installs,
    run_export,
)
from engine.convert import ConvertRequest, ConvertResult, run_convert
from engine.demo import build_demo_lora, build_demo_model
from engine.hub import EXAMPLE_REPO, DownloadRequest, plan_download, plan_summary, run_download
from engine.info import CheckpointInfo, inspect_checkpoint
from engine.int8.quantize import SCHEMES
from engine.int8.rotation import ROTATION_POLICIES
from engine.jobs import Cancelled, JobError, OutputExistsError, Progress, format_duration
from engine.library import (
    LIBRARY_KINDS,
    MODEL_KINDS,
    LibraryRequest,
    LibraryResult,
    comfyui_folders,
    export_kind,
    run_library_scan,
)
from engine.lora import (
    MODES,
    LoraInfo,
    LoraMergeRequest,
    LoraSpec,
    MergeStats,
    inspect_lora,
    run_lora_merge,
)

COMMANDS: dict[str, "callable"] = {}


def command(name: str, help: str):
    """Register ``fn(subparser)`` as the builder of subcommand ``name``; it sets ``func`` as default."""

    def register(fn):
        COMMANDS[name] = (help, fn)
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int8-studio", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"int8-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, build) in COMMANDS.items():
        build(sub.add_parser(name, help=help_text, description=help_text))
    return parser


class ProgressBar:
    """A progress callback that redraws one line on a terminal, with the stage's ETA.

    Silent when ``stream`` is not a TTY (pipes, logs, CI), so output stays clean there.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(self.stream) and self.stream.isatty()
        self.interval = interval
        self._stage: str | None = None
        self._drawn = 0.0

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if p.stage == self._stage and p.done < p.total and now - self._drawn < self.interval:
            return
        if self._stage not in (None, p.stage):
            self.stream.write("\n")
        self._stage, self._drawn = p.stage, now
        width = shutil.get_terminal_size().columns
        filled = round(p.fraction * 24)
        eta = p.eta_seconds
        line = f"{p.stage} [{'#' * filled}{'.' * (24 - filled)}] {p.fraction:4.0%}"
        line += f"  ETA {format_duration(eta)}" if eta is not None and p.done < p.total else ""
        line += f"  {p.message}" if p.message else ""
        self.stream.write("\r" + line[: width - 1] + "\x1b[K")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()


@command("convert", help="convert a checkpoint (single file or diffusers folder) to an INT8 file")
def _convert_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help=".safetensors file, diffusers model folder or its index json")
    p.add_argument("-o", "--output", type=Path, help="default: <source>-int8-<scheme>.safetensors beside it")
    p.add_argument("--scheme", choices=SCHEMES, default="tensorwise", help="one scale per weight or per row")
    p.add_argument(
        "--rotate", choices=ROTATION_POLICIES, default="none",
        help="Hadamard-rotate no layer, the down-projections or every layer: lower int8 error, a few %% "
        "slower; the file then needs a ComfyUI that reads the 'convrot' marker",
    )  # fmt: skip
    p.add_argument(
        "--keep", action="extend", type=comma_separated, default=[], metavar="PATTERN[,PATTERN...]",
        help="keep these in high precision too (glob; repeat the option or separate with commas)",
    )  # fmt: skip
    p.add_argument(
        "--cast-float32", action="store_true",
        help="write the float32 tensors that stay in high precision as bf16 (default: keep them float32)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(func=_run_convert, replace_flag="--force")


def comma_separated(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``; blanks around and between the commas are dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _run_convert(args: argparse.Namespace) -> int:
    request = ConvertRequest(
        args.source, args.output, args.scheme, tuple(args.keep),
        cast_float32_to_bf16=args.cast_float32, overwrite=args.force, rotate=args.rotate,
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


@command("demo", help="build the built-in demo model and its LoRA, convert the model to INT8 and inspect it")
def _demo_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", type=Path, help="where to put the demo files (default: user cache folder)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
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
    merged = result.output.with_name(result.output.stem + "-lora.safetensors")
    print(f"next, merge the demo LoRA: int8-studio lora merge {result.output} {lora} -o {merged}")
    return 0


@command("bench", help="seconds per step of a model in bf16, fp8 and int8, with each format's quality cost")
def _bench_command(p: argparse.ArgumentParser) -> None:
    gpu, cpu = bench_defaults(gpu=True), bench_defaults(gpu=False)
    p.add_argument(
        "source", nargs="?",
        help="a checkpoint, or a model name with random weights: flux2-klein-9b, zimage-turbo, …; "
        f"default: {gpu.source} on a GPU; on the CPU {cpu.source} at {cpu.resolution}×{cpu.resolution}, "
        f"{cpu.steps} steps, formats {','.join(cpu.formats)} (unless given)",
    )  # fmt: skip
    p.add_argument("--res", type=int, help=f"image side in pixels (default {gpu.resolution})")
    p.add_argument("--steps", type=int, help=f"timed steps per format, after warm-up (default {gpu.steps})")
    p.add_argument(
        "--formats",
        type=lambda text: tuple(text.split(",")),
        help=f"comma-separated, from {','.join(FORMATS)} (default: all)",
    )
    p.add_argument(
        "--scheme", choices=SCHEMES, default="rowwise", help="int8 weight scales: one per weight or per row"
    )
    p.add_argument(
        "--rotate", choices=ROTATION_POLICIES, default="none",
        help="int8 formats of a float model: Hadamard-rotate no layer, the down-projections or all",
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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    if args.source is None:  # what the app's form starts from on this machine
        request = bench_defaults(gpu=args.device != "cpu" and torch.cuda.is_available())
    else:
        request = BenchRequest(args.source)
    chosen = {"resolution": args.res, "steps": args.steps, "formats": args.formats}
    request = replace(
        request, **{k: v for k, v in chosen.items() if v is not None}, scheme=args.scheme, batch=args.batch,
        text_tokens=args.text_tokens, device=args.device, cuda_graphs=args.cuda_graphs, rotate=args.rotate,
        max_vram_gb=args.max_vram,
    )  # fmt: skip
    with ProgressBar() as bar:
        result = run_bench(request, progress=bar)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


@command("lora", help="merge LoRAs into a model (INT8 or float), or show what a LoRA file is")
def _lora_command(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    merge = sub.add_parser("merge", help="merge LoRAs into a model and write a new file of the same format")
    merge.add_argument("model", type=Path, help="the model: INT8 or float .safetensors, or a diffusers folder")
    merge.add_argument(
        "loras", nargs="+", type=lora_spec, metavar="LORA[:STRENGTH]", help="LoRA files, strength 1 by default"
    )
    merge.add_argument("-o", "--output", type=Path, required=True, help="the merged model's file")
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
    merge.add_argument("--force", action="store_true", help="replace the output file if it exists")
    merge.set_defaults(func=_run_lora_merge, replace_flag="--force")
    inspect = sub.add_parser("inspect", help="format, rank, target architecture and key coverage of a LoRA")
    inspect.add_argument("lora", type=Path, help="the LoRA .safetensors file")
    inspect.add_argument("--model", type=Path, help="measure coverage on this model (default: the best guess)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=_run_lora_inspect)


def lora_spec(text: str) -> LoraSpec:
    """``style.safetensors:0.8`` → (path, 0.8); a colon not followed by a number is part of the path."""
    path, colon, strength = text.rpartition(":")
    try:
        return LoraSpec(Path(path), float(strength)) if colon and path else LoraSpec(Path(text))
    except ValueError:
        if path.endswith(".safetensors"):
            raise argparse.ArgumentTypeError(f"strength {strength!r} of {path} is not a number") from None
        return LoraSpec(Path(text))


def _run_lora_merge(args: argparse.Namespace) -> int:
    request = LoraMergeRequest(args.model, tuple(args.loras), args.output, args.mode, args.seed, args.force)
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


@command("app", help="open the desktop app (what int8-studio does with no arguments)")
def _app_command(p: argparse.ArgumentParser) -> None:
    from app.__main__ import add_arguments, run  # the app package imports Qt only when it runs

    add_arguments(p).set_defaults(func=run)


@command("comfyui", help="ComfyUI installs: 'comfyui find' lists them and their model folders")
def _comfyui_command(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    find = actions.add_parser("find", help="list the ComfyUI installs found, with their model folders")
    find.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="ComfyUI folders to add")
    find.add_argument("--json", action="store_true", help="print JSON instead of text")
    find.set_defaults(func=_run_comfyui_find)


def _run_comfyui_find(args: argparse.Namespace) -> int:
    installs = find_installs(args.paths)
    if not installs:
        raise ComfyUIError("no ComfyUI install found in the usual places; give its folder: comfyui find PATH")
    if args.json:
        described = [asdict(i) | {"export_folders": _export_folders(i)} for i in installs]
        print(json.dumps(described, default=str, indent=2))
    else:
        print("\n\n".join(_describe_install(i) for i in installs))
    return 0


def _export_folders(install: ComfyInstall) -> dict[str, str]:
    return {} if install.problems else {kind: str(install.export_folder(kind)) for kind in EXPORT_KINDS}


def _describe_install(install: ComfyInstall) -> str:
    lines = [install.label]
    for kind, folder in _export_folders(install).items():
        lines.append(f"  {'export ' + kind:<24} {folder}")
    for kind in LIBRARY_KINDS:
        for n, f in enumerate(install.folders.get(kind, [])):
            notes = [note for note, on in (("default", f.is_default), ("missing", not f.path.is_dir())) if on]
            origin = "" if f.origin in ("models", "output") else f.origin
            extra = ", ".join(filter(None, [*notes, origin]))
            lines.append(f"  {kind if n == 0 else '':<24} {f.path}" + (f"  ({extra})" if extra else ""))
    lines += [f"  {'config':<24} {file}" for file in install.config_files]
    lines += [f"  {'problem':<24} {problem}" for problem in install.problems]
    return "\n".join(lines)


def _choose_install(path: Path | None) -> ComfyInstall:
    """The install a command means: the one given, else the only one found."""
    if path is not None:
        return find_installs([path])[0]
    installs = find_installs()
    if len(installs) == 1:
        return installs[0]
    if not installs:
        raise ComfyUIError("no ComfyUI install found in the usual places; give its folder with --comfyui PATH")
    found = "; ".join(i.label for i in installs)
    raise ComfyUIError(f"found {len(installs)} ComfyUI installs ({found}); choose one with --comfyui PATH")


@command("export", help="put a converted or merged file into a ComfyUI models folder, verified")
def _export_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the .safetensors file to export")
    p.add_argument("--comfyui", type=Path, metavar="PATH", help="the ComfyUI folder (default: the one found)")
    p.add_argument(
        "--kind", choices=EXPORT_KINDS, help="which models folder (default: loras for a LoRA, else diffusion_models)"
    )
    p.add_argument("--name", help="file name in the folder (default: the file's own)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of that name")
    p.add_argument("--copy", action="store_true", help="copy even where a hard link would do")
    p.set_defaults(func=_run_export, replace_flag="--overwrite")


def _run_export(args: argparse.Namespace) -> int:
    install = _choose_install(args.comfyui)
    with ProgressBar() as bar:
        result = _export(
            args.file, install, args.kind, bar, name=args.name, overwrite=args.overwrite, link=not args.copy
        )
    print(result.summary)
    return 0


def _export(path: Path, install: ComfyInstall, kind: str | None, progress: ProgressBar, **options) -> ExportResult:
    """Export ``path`` into ``install``'s folder for ``kind`` (default: the file's own, as the app chooses)."""
    kind = kind or export_kind(path)
    request = ExportRequest(path, install.export_folder(kind), kind, **options)
    return run_export(request, progress=progress)


@command("library", help="list the diffusion models and LoRAs in ComfyUI's model folders or in folders given")
def _library_command(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths", nargs="*", type=Path, metavar="PATH",
        help="folders to scan and files to list (default: ComfyUI's folders)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_library)


def _run_library(args: argparse.Namespace) -> int:
    folders = [p for p in args.paths if not p.is_file()] if args.paths else comfyui_folders(find_installs())
    if not args.paths and not folders:
        raise ComfyUIError("no ComfyUI install found in the usual places; give the folders to scan")
    request = LibraryRequest(tuple(folders), tuple(p for p in args.paths if p.is_file()))
    with ProgressBar() as bar:
        result = run_library_scan(request, progress=bar)
    if args.json:
        print(json.dumps([asdict(e) for e in result.entries], default=str, indent=2))
    else:
        print(_library_table(result))
    return 0


def _library_table(result: LibraryResult) -> str:
    lines = [f"{'kind':<16}{'model':<26}{'format':<28}{'size':>9}  {'date':<11}file"]
    for e in result.entries:
        what = e.model if e.kind in (*MODEL_KINDS, "LoRA") else e.note
        date = time.strftime("%Y-%m-%d", time.localtime(e.modified))
        lines.append(f"{e.kind:<16}{what[:25]:<26}{e.format:<28}{format_bytes(e.size):>9}  {date:<11}{e.path}")
    lines += [f"(missing folder: {folder})" for folder in result.missing]
    return "\n".join(lines if result.entries else lines[1:] + ["no .safetensors files found"])


@command("download", help="download a model from the Hugging Face hub (sizes first, resumable, cancellable)")
def _download_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", help=f"the repo, e.g. {EXAMPLE_REPO}")
    p.add_argument("files", nargs="*", metavar="FILE", help="files or patterns (default: the repo's model)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--to", type=Path, metavar="FOLDER", help="into this folder (default: the hub cache)")
    where.add_argument(
        "--comfyui", nargs="?", const="", metavar="PATH",
        help="then export the models into this ComfyUI (default: the one found)",
    )  # fmt: skip
    p.add_argument(
        "--kind", choices=EXPORT_KINDS, help="with --comfyui: where (default: loras for a LoRA, else diffusion_models)"
    )
    p.add_argument("--offline", action="store_true", help="use only what is already downloaded")
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    request = DownloadRequest(args.repo, tuple(args.files), args.revision, folder=args.to, offline=args.offline)
    plan = plan_download(request)
    if args.comfyui is not None and any(f.name.endswith(".safetensors.index.json") for f in plan):
        raise ComfyUIError(
            f"{args.repo} holds a sharded diffusers model, which ComfyUI does not load: download it without "
            "--comfyui, then convert it (int8-studio convert FOLDER) and export the result"
        )
    print(f"{args.repo}: {plan_summary(plan)}")
    for f in plan:
        print(f"  {f.label}")
    with ProgressBar() as bar:
        result = run_download(request, progress=bar)
        if args.comfyui is not None:
            install = _choose_install(Path(args.comfyui) if args.comfyui else None)
            exported = [_export(p, install, args.kind, bar) for p in result.models]
    for path in result.paths:
        print(path)
    for r in exported if args.comfyui is not None else []:
        print(r.summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from app.__main__ import main as app_main

        return app_main()
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    try:
        return args.func(args) or 0
    except (Cancelled, KeyboardInterrupt):
        print("int8-studio: cancelled", file=sys.stderr)
        return 130
    except JobError as exc:
        flag = getattr(args, "replace_flag", None)  # the engine's "… or replace it" names no switch
        how = f" with {flag}" if flag and isinstance(exc, OutputExistsError) else ""
        print(f"int8-studio: error: {exc}{how}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
