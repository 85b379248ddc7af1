"""`int8-studio`: the command-line face of the engine. With no arguments it opens the desktop app.

Exit status: 0 success, 2 bad input or user error (one line on stderr), 1 internal error,
130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys

from engine import __version__
from engine.jobs import Cancelled, JobError

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
        print(f"int8-studio: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
