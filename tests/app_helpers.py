"""What the app tests share besides their fixtures (in conftest.py): how long to wait for a job, how
to give the Convert page its source, and how to find the message box a window shows."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QMessageBox

WAIT = 30_000  # ms; generous for 2-core CI machines


def pick_source(qtbot, page, path: Path) -> None:
    """Open ``path`` on the Convert page and wait until it is read (or refused)."""
    page.open_path(path)
    qtbot.waitUntil(lambda: page.info is not None or page.source_problem.isVisible(), timeout=WAIT)


def message_box(qtbot, window, name: str) -> QMessageBox:
    qtbot.waitUntil(lambda: window.findChild(QMessageBox, name) is not None, timeout=WAIT)
    return window.findChild(QMessageBox, name)
