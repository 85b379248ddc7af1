"""What every engine job shares: progress reports, cancellation and user-facing errors.

A job is a plain function ``job(inputs, progress=..., cancel=...)``. It reports through ``progress``
(called on the job's own thread) and checks ``cancel`` between units of work. The CLI and the Qt app
are thin faces over the same jobs: the CLI draws a progress bar, the app turns the callbacks into
signals.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class JobError(Exception):
    """An error caused by the user's input or environment, with a one-line message they can act on.

    The CLI prints the message and exits with status 2; the app shows it in a dialog. Anything that
    is not a JobError is a bug in INT8 Studio (exit status 1).
    """


class OutputExistsError(JobError):
    """The output file exists and the request does not allow replacing it.

    The message names no switch: the CLI adds its own flag, the app shows its replace checkbox.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists; choose another name or replace it")
        self.path = path


class Cancelled(JobError):
    """The user cancelled the job. Whatever it was writing has been removed."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


class CancelToken:
    """Set from any thread; the job polls it between units of work and stops."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled()


@dataclass(frozen=True)
class Progress:
    """One progress report: ``done`` out of ``total`` units (bytes, tensors, steps) of ``stage``."""

    stage: str
    done: float
    total: float
    message: str = ""
    started: float = field(default=0.0, compare=False)

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)

    @property
    def eta_seconds(self) -> float | None:
        """Linear estimate of the time left, or None before there is anything to go on."""
        if not self.started or self.done <= 0 or self.total <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed * (self.total - self.done) / self.done


def format_duration(seconds: float) -> str:
    """``"8 s"``, ``"3 min 05 s"``, ``"2 h 04 min"``: how long, in the words both faces show."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    pass


class Reporter:
    """Helper for jobs: remembers the stage's start time so every report can carry an ETA."""

    def __init__(self, callback: ProgressFn | None, stage: str, total: float) -> None:
        self.callback = callback or no_progress
        self.stage = stage
        self.total = total
        self.started = time.monotonic()

    def __call__(self, done: float, message: str = "") -> None:
        self.callback(Progress(self.stage, done, self.total, message, self.started))
