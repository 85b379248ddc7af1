"""The CLI's progress display: one line per stage, redrawn in place, with the stage's ETA."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from engine.jobs import Progress, format_duration


class ProgressBar:
    """A progress callback that redraws one line on a terminal, with the stage's ETA.

    Silent when ``stream`` is not a TTY (pipes, logs, CI), so output stays clean there.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(self.stream) and self.stream.isatty()
        self.interval = interval
        self._stage: str | None = None
        self._drawn = 0.0

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if p.stage == self._stage and p.done < p.total and now - self._drawn < self.interval:
            return
        if self._stage not in (None, p.stage):
            self.stream.write("\n")
        self._stage, self._drawn = p.stage, now
        width = shutil.get_terminal_size().columns
        filled = round(p.fraction * 24)
        eta = p.eta_seconds
        line = f"{p.stage} [{'#' * filled}{'.' * (24 - filled)}] {p.fraction:4.0%}"
        line += f"  ETA {format_duration(eta)}" if eta is not None and p.done < p.total else ""
        line += f"  {p.message}" if p.message else ""
        self.stream.write("\r" + line[: width - 1] + "\x1b[K")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()
