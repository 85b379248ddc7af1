"""What every engine job shares: progress reports, cancellation and user-facing errors.

A job is a plain function ``job(inputs, progress=..., cancel=...)``. It reports through ``progress``
(called on the job's own thread) and checks ``cancel`` between units of work. The CLI and the Qt app
are thin faces over the same jobs: the CLI draws a progress bar, the app turns the callbacks into
signals.
"""

from __future__ import annotations

import os
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

    The message names no switch: the CLI adds its own flag (``--overwrite``); the app asks Replace /
    Keep both / Cancel in that job's panel, for that one job.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists; choose another name or replace it")
        self.path = path


class Cancelled(JobError):
    """The user cancelled the job. Whatever it was writing has been removed."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


class Stopped(KeyboardInterrupt):
    """A stop request from outside the process (Ctrl-C, ``kill``, a closed terminal: the CLI's signal
    handlers raise it in the main thread). It unwinds like Ctrl-C, so every writer's ``with`` block and
    ``finally`` removes its temporary file."""

    def __init__(self, signo: int) -> None:
        super().__init__(f"signal {signo}")
        self.signo = signo


STOP_REQUESTS: list[int] = []
"""The stop signals this process received. A signal handler's exception can land where Python swallows
it (a weakref callback, a ``__del__``): :meth:`CancelToken.check` raises it again at the job's next
check, so a stop request is never lost."""


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
        """Raise :class:`Cancelled` if cancellation was requested, :class:`Stopped` if the process was
        asked to stop (in the main thread: where the signal handlers raise it)."""
        if STOP_REQUESTS and threading.current_thread() is threading.main_thread():
            raise Stopped(STOP_REQUESTS[0])
        if self._event.is_set():
            raise Cancelled()


TEMPORARY_FILES: set[Path] = set()
"""The temporary files (``.name.partial-*``) jobs of this process are writing: the writers remove their
own when they fail or are stopped; :func:`remove_temporary_files` sweeps whatever a stop request
caught between creating a file and taking charge of it."""

NAME_MAX = 255
"""The longest file name, in bytes, of the file systems INT8 Studio writes to (ext4, NTFS, APFS)."""


def temporary_name(name: str, token: str) -> str:
    """``.NAME.partial-TOKEN``, the name cut short so that the result fits :data:`NAME_MAX` bytes."""
    room = NAME_MAX - len(f"..partial-{token}".encode())
    encoded = os.fsencode(name)
    if len(encoded) > room:
        name = os.fsdecode(encoded[:room])
    return f".{name}.partial-{token}"


def display_name(name: str) -> str:
    """A file name as text that can be written anywhere (JSON, UTF-8): bytes of a name that are not
    UTF-8 (kept by Python as surrogates) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def os_error_message(e: OSError) -> str:
    """``cannot open PATH: No such file or directory``: an OSError in a user's words."""
    what = f" {short(os.fsdecode(e.filename))}" if e.filename is not None else ""
    return f"cannot use{what}: {e.strerror or e}"


def check_name(path: Path) -> None:
    """Refuse an output name longer than :data:`NAME_MAX` bytes (the file system would refuse it)."""
    size = len(os.fsencode(Path(path).name))
    if size > NAME_MAX:
        raise JobError(
            f"the output name {short(Path(path).name)} is {size} bytes long, over the {NAME_MAX}-byte "
            "limit of file names; choose a shorter name"
        )


NAME_LIMIT = 80
"""Characters of a name from a file that a message shows (a hostile header can hold megabytes)."""


def short(text: str, limit: int = NAME_LIMIT) -> str:
    """``text`` cut in the middle to ``limit`` characters, for messages."""
    return text if len(text) <= limit else f"{text[: limit // 2 - 1]}…{text[-(limit - limit // 2):]}"


def remove_temporary_files() -> None:
    """Remove every temporary file still registered (a stopped process calls this on its way out)."""
    for path in list(TEMPORARY_FILES):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        TEMPORARY_FILES.discard(path)


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
