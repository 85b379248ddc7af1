"""What the app tests share besides their fixtures (in conftest.py): how long to wait for a job, and
how to give the Convert page its source."""

from __future__ import annotations

from pathlib import Path

WAIT = 30_000  # ms; generous for 2-core CI machines


def pick_source(qtbot, page, path: Path) -> None:
    """Open ``path`` on the Convert page and wait until it is read (or refused)."""
    page.open_path(path)
    qtbot.waitUntil(lambda: page.info is not None or page.source_problem.isVisible(), timeout=WAIT)
