"""The parser: every command module registers its subcommands; :func:`run` parses and runs one.

Imported by :func:`engine.cli.main` once its stop handlers are in place. Light: the command modules
import torch, Triton, Qt and the hub client only inside the command that needs them, and only the
subcommand being run gets its full parser (a builder may import a job for its choices), so ``--help``
and ``inspect`` start in a fraction of a second (benchmarks/startup.py)."""

from __future__ import annotations

import argparse
import sys

from engine import __version__
from engine.cli import bench, comfyui, convert, desktop, lora
from engine.cli.commands import COMMANDS, OVERWRITE
from engine.jobs import Cancelled, JobError, OutputExistsError, os_error_message

GROUPS = (convert, bench, lora, desktop, comfyui)
"""The command modules (importing one registers its commands), in the order ``--help`` lists them."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, with its full arguments for ``command`` only (all of them when None, none when
    ``""``: the top-level ``--help`` lists the commands' names and help lines only)."""
    from engine.cli import DESCRIPTION

    parser = argparse.ArgumentParser(prog="int8-studio", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"int8-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    order = {group.__name__: n for n, group in enumerate(GROUPS)}
    for name, (help_text, build) in sorted(COMMANDS.items(), key=lambda item: order[item[1][1].__module__]):
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            build(subparser)
    return parser


def command_name(argv: list[str]) -> str | None:
    """The subcommand ``argv`` runs: its first word that is not an option (the top level has only
    ``--help`` and ``--version``, which take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def run(argv: list[str]) -> int:
    """Parse ``argv`` and run its command; a :class:`JobError` is one line on stderr and status 2."""
    if not argv:
        return desktop.open_app()
    parser = build_parser(command_name(argv) or "")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except Cancelled:
        print("int8-studio: cancelled", file=sys.stderr)
        return 130
    except JobError as exc:
        replaceable = isinstance(exc, OutputExistsError) and hasattr(args, "overwrite")
        how = f" with {OVERWRITE}" if replaceable else ""  # the engine's "… or replace it" names no switch
        print(f"int8-studio: error: {exc}{how}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the reader of our output went away: main() ends quietly
    except OSError as exc:  # the file system refused something the job did not foresee: not a bug
        print(f"int8-studio: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
