"""Run one engine job on a worker thread and turn its callbacks into Qt signals.

An engine job is ``fn(*args, progress=callback, cancel=token, **kwargs) -> result`` (see
``engine/jobs.py``). :class:`Job` calls it on a thread pool, so the window never freezes, and
delivers on the GUI thread:

- ``progress(Progress)`` at most ~20 times a second (the last report of a stage always arrives);
- then exactly one of ``succeeded(result)``, ``failed(JobError)``, ``cancelled()`` or
  ``crashed(summary, details)`` (an exception that is not a JobError: a bug, with its traceback);
- then ``finished()``.

``cancel()`` sets the job's :class:`CancelToken`; the job stops at its next check and removes what it
was writing. Signals emitted on the worker thread reach the Job (which lives on the GUI thread)
through queued connections, which is what makes the hand-over thread-safe. A job started for an
``owner`` widget goes quiet once that widget is deleted (its window closed while the job ran), so no
handler ever touches a deleted widget.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any, ClassVar

import shiboken6
from PySide6.QtCore import QObject, Qt, QThreadPool, Signal

from engine.jobs import Cancelled, CancelToken, JobError, Progress

PROGRESS_INTERVAL = 0.05  # seconds between progress signals (~20 Hz)

_POOL = QThreadPool()
_POOL.setMaxThreadCount(8)  # a few long jobs (convert, download) must not queue behind each other


class Job(QObject):
    progress = Signal(object)  # Progress
    succeeded = Signal(object)  # the job's result
    failed = Signal(object)  # JobError (not Cancelled)
    cancelled = Signal()
    crashed = Signal(str, str)  # one-line summary, full traceback
    finished = Signal()

    _reported = Signal(object)  # worker thread -> GUI thread
    _ended = Signal(str, object)  # outcome, payload

    _active: ClassVar[set[Job]] = set()  # running jobs, kept alive until they finish

    def __init__(self, title: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.title = title
        self._call = lambda progress, cancel: fn(*args, progress=progress, cancel=cancel, **kwargs)
        self._token = CancelToken()
        self._last_emit = 0.0
        self._last_stage: str | None = None
        self.last_progress: Progress | None = None
        self.running = False
        self._owner: QObject | None = None
        self.background = False  # reads only (headers, folder scans): closing need not ask
        self._reported.connect(self._on_reported, Qt.ConnectionType.QueuedConnection)
        self._ended.connect(self._on_ended, Qt.ConnectionType.QueuedConnection)

    @classmethod
    def call(cls, title: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
        """A background job for a function that takes neither progress nor cancel (a header read)."""
        job = cls(title, lambda progress, cancel: fn(*args, **kwargs))
        job.background = True
        return job

    @classmethod
    def active(cls) -> list[Job]:
        """Jobs started and not yet finished (the window asks before closing over them)."""
        return list(cls._active)

    def start(self, owner: QObject | None = None) -> Job:
        self._owner = owner
        self.running = True
        Job._active.add(self)
        _POOL.start(self._run)
        return self

    def cancel(self) -> None:
        self._token.cancel()

    @property
    def cancelling(self) -> bool:
        return self._token.cancelled

    # --- worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            result = self._call(self._on_progress, self._token)
            # A job that finished before it saw a late cancel succeeded: its output is complete.
            self._ended.emit("succeeded", result)
        except Cancelled:
            self._ended.emit("cancelled", None)
        except JobError as exc:
            self._ended.emit("failed", exc)
        except BaseException as exc:  # noqa: BLE001  (a bug: show it, never kill the app)
            details = "".join(traceback.format_exception(exc))
            self._ended.emit("crashed", (f"{type(exc).__name__}: {exc}", details))

    def _on_progress(self, report: Progress) -> None:
        now = time.monotonic()
        last_of_stage = report.total > 0 and report.done >= report.total
        recent = now - self._last_emit < PROGRESS_INTERVAL
        if report.stage == self._last_stage and recent and not last_of_stage:
            return
        self._last_emit, self._last_stage = now, report.stage
        self._reported.emit(report)

    # --- GUI thread ------------------------------------------------------------------------------

    def _heard(self) -> bool:
        return self._owner is None or shiboken6.isValid(self._owner)

    def _on_reported(self, report: Progress) -> None:
        if self.running and self._heard():
            self.last_progress = report
            self.progress.emit(report)

    def _on_ended(self, outcome: str, payload: Any) -> None:
        self.running = False
        Job._active.discard(self)
        if not self._heard():
            return
        if outcome == "succeeded":
            self.succeeded.emit(payload)
        elif outcome == "cancelled":
            self.cancelled.emit()
        elif outcome == "failed":
            self.failed.emit(payload)
        else:
            self.crashed.emit(*payload)
        self.finished.emit()
