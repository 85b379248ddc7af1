"""The desktop app: `int8-studio` with no arguments, `int8-studio app [FILE] [--demo]`, `python -m app`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("file", nargs="?", type=Path, help="a model or LoRA to open")
    parser.add_argument(
        "--demo", action="store_true", help="open on the built-in demo model (built on first use)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="int8-studio app", description="Open the INT8 Studio window."
    )
    return run(add_arguments(parser).parse_args(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace) -> int:
    from app.qt_libraries import check_qt_platform

    problem = check_qt_platform()
    if problem:  # Qt would abort the process with a message that names no library
        print(problem, file=sys.stderr)
        return 2
    from PySide6.QtWidgets import QApplication

    from app.settings import Settings
    from app.ui import theme
    from engine import __version__

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName("INT8 Studio")
    app.setApplicationName("INT8 Studio")
    app.setApplicationVersion(__version__)
    app.setWindowIcon(theme.icon("logo", "#000000"))
    window = open_window(args, Settings())  # noqa: F841  (kept alive until the app quits)
    return app.exec()


def open_window(args: argparse.Namespace, settings):
    """The main window, shown: on the page for ``args.file`` (not the page last used); for ``--demo``
    on Convert with the demo model, which is also the LoRA page's model with its demo LoRA in the
    stack; else on the page last used."""
    from app.ui.main_window import MainWindow

    window = MainWindow(settings)
    window.show()
    if args.file:
        from app.ui.library import page_for_path

        window.open_path(page_for_path(args.file), args.file)
    elif args.demo:
        window.show_page("convert")
        demo = window.pages["convert"].use_demo()
        demo.succeeded.connect(lambda path: window.pages["lora"].open_path(Path(path)))
    return window

if __name__ == "__main__":
    sys.exit(main())
