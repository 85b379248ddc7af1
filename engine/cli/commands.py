"""The subcommands' registry: each command module registers the builder of its parser with
:func:`command`; :func:`engine.cli.build_parser` adds them, a module's in the order it registers them."""

from __future__ import annotations

COMMANDS: dict[str, "callable"] = {}


def command(name: str, help: str):
    """Register ``fn(subparser)`` as the builder of subcommand ``name``; it sets ``func`` as default."""

    def register(fn):
        COMMANDS[name] = (help, fn)
        return fn

    return register
