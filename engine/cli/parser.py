"""`int8-studio`: the command-line face of the engine. With no arguments it opens the desktop app.

Exit status: 0 success, 2 bad input or user error (one line on stderr), 1 internal error,
130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys

from engine import __version__
from engine.cli import bench, comfyui, convert, desktop, lora
from engine.cli.commands import COMMANDS
from engine.jobs import Cancelled, JobError, OutputExistsError

GROUPS = (convert, bench, lora, desktop, comfyui)
"""The command modules (importing one registers its commands), in the order ``--help`` lists them."""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int8-studio", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"int8-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    order = {group.__name__: n for n, group in enumerate(GROUPS)}
    for name, (help_text, build) in sorted(COMMANDS.items(), key=lambda item: order[item[1][1].__module__]):
        build(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return desktop.open_app()
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
