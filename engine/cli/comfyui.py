"""`comfyui find`, `export`, `library` and `download`: ComfyUI installs, files exported into them, the
models in their folders, and models fetched from the Hugging Face hub."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli import node_pack
from engine.cli.commands import add_overwrite, command
from engine.cli.progress import ProgressBar
from engine.units import format_bytes

if TYPE_CHECKING:  # the jobs import huggingface_hub, yaml, torch: each command imports its own when it runs
    from engine.comfyui import ComfyInstall
    from engine.export import ExportResult
    from engine.library import LibraryResult


@command("comfyui", help="ComfyUI installs: 'comfyui find' lists them; 'comfyui install-node' adds our nodes")
def _comfyui_command(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    find = actions.add_parser("find", help="list the ComfyUI installs found, with their model folders")
    find.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="ComfyUI folders to add")
    find.add_argument("--json", action="store_true", help="print JSON instead of text")
    find.set_defaults(func=_run_comfyui_find)
    node_pack.add_actions(actions)  # install-node, remove-node, node-status


def _run_comfyui_find(args: argparse.Namespace) -> int:
    from engine.comfyui import ComfyUIError, find_installs

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
    from engine.export import EXPORT_KINDS

    return {} if install.problems else {kind: str(install.export_folder(kind)) for kind in EXPORT_KINDS}


def _describe_install(install: ComfyInstall) -> str:
    from engine.library import LIBRARY_KINDS

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
    from engine.comfyui import ComfyUIError, find_installs

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
    from engine.export import EXPORT_KINDS

    p.add_argument("file", type=Path, help="the .safetensors file to export")
    p.add_argument("--comfyui", type=Path, metavar="PATH", help="the ComfyUI folder (default: the one found)")
    p.add_argument(
        "--kind", choices=EXPORT_KINDS, help="which models folder (default: loras for a LoRA, else diffusion_models)"
    )
    p.add_argument("--name", help="file name in the folder (default: the file's own)")
    add_overwrite(p, "a file of that name")
    p.add_argument("--copy", action="store_true", help="copy even where a hard link would do")
    p.set_defaults(func=_run_export)


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
    from engine.export import ExportRequest, run_export
    from engine.library import export_kind

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
    from engine.comfyui import ComfyUIError, find_installs
    from engine.library import LibraryRequest, comfyui_folders, run_library_scan

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
    from engine.library import MODEL_KINDS

    lines = [f"{'kind':<16}{'model':<26}{'format':<28}{'size':>9}  {'date':<11}file"]
    for e in result.entries:
        what = e.model if e.kind in (*MODEL_KINDS, "LoRA") else e.note
        date = time.strftime("%Y-%m-%d", time.localtime(e.modified))
        lines.append(f"{e.kind:<16}{what[:25]:<26}{e.format:<28}{format_bytes(e.size):>9}  {date:<11}{e.path}")
    lines += [f"(missing folder: {folder})" for folder in result.missing]
    return "\n".join(lines if result.entries else lines[1:] + ["no .safetensors files found"])


@command("download", help="download a model from the Hugging Face hub (sizes first, resumable, cancellable)")
def _download_command(p: argparse.ArgumentParser) -> None:
    from engine.export import EXPORT_KINDS
    from engine.hub import EXAMPLE_REPO

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
    from engine.comfyui import ComfyUIError
    from engine.hub import DownloadRequest, plan_download, plan_summary, run_download

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
