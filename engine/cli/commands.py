"""The subcommands' registry: each command module registers the builder of its parser with
:func:`command`; :func:`engine.cli.build_parser` adds them, a module's in the order it registers them.
Options several commands share are added here, so they have one name and one meaning."""

from __future__ import annotations

import argparse

COMMANDS: dict[str, "callable"] = {}
OVERWRITE = "--overwrite"
"""The switch that lets a command replace an existing output (the engine's ``overwrite``; the app's
"Replace" box). ``--force``, its earlier name in ``convert`` and ``lora merge``, still works, unlisted."""


def command(name: str, help: str):
    """Register ``fn(subparser)`` as the builder of subcommand ``name``; it sets ``func`` as default."""

    def register(fn):
        COMMANDS[name] = (help, fn)
        return fn

    return register


def add_overwrite(p: argparse.ArgumentParser, what: str = "the output file") -> None:
    """Add :data:`OVERWRITE` (``args.overwrite``): replace ``what`` if it exists."""
    p.add_argument(OVERWRITE, action="store_true", help=f"replace {what} if it exists")
    p.add_argument("--force", dest="overwrite", action="store_true", help=argparse.SUPPRESS)
