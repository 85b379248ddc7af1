"""`app`: the desktop app, which `int8-studio` also opens with no arguments. The app package imports Qt,
so it is imported only when it runs."""

from __future__ import annotations

import argparse

from engine.cli.commands import command


@command("app", help="open the desktop app (what int8-studio does with no arguments)")
def _app_command(p: argparse.ArgumentParser) -> None:
    from app.__main__ import add_arguments, run  # the app package imports Qt only when it runs

    add_arguments(p).set_defaults(func=run)


def open_app() -> int:
    """Open the desktop app with its default settings; its exit status."""
    from app.__main__ import main

    return main()
