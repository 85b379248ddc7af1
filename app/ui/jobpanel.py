"""The row every long action gets: what it is doing, a progress bar, time left and a Cancel button;
then how it ended, in the same place."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.ui import dialogs, theme
from app.ui.cards import Notice
from app.workers import Job
from engine.jobs import JobError, OutputExistsError, Progress, format_duration

# exists(error, replace): run the job again, replacing the existing output or keeping both
Rerun = Callable[[OutputExistsError, bool], None]


class JobPanel(QWidget):
    """Shows one :class:`Job` at a time, and how it ended, under the button that started it.

    After the job ends the panel keeps its outcome ("Done in 12 s", "Cancelled: nothing was written")
    until the next job starts or :meth:`clear` (the page's input changed). A JobError is shown here as
    a warning, once (no dialog besides); a crash is a bug report dialog with its details.
    """

    started = Signal(object)  # Job: each job this panel runs (the window's jobs indicator follows it)

    def __init__(self) -> None:
        super().__init__()
        self.job: Job | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        top = QHBoxLayout()
        self.stage = QLabel()
        self.stage.setWordWrap(True)
        self.stage.setAccessibleName("Job status")
        self.eta = QLabel()
        self.eta.setProperty("muted", True)
        self.eta.setAccessibleName("Time left")
        top.addWidget(self.stage, 1)
        top.addWidget(self.eta)
        bottom = QHBoxLayout()
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setAccessibleName("Progress")
        self.cancel_button = QPushButton("Cancel")
        theme.bind_icon(self.cancel_button, "stop")
        self.cancel_button.setToolTip("Stop now. Whatever was being written is removed.")
        self.cancel_button.clicked.connect(self.cancel)
        bottom.addWidget(self.bar, 1)
        bottom.addWidget(self.cancel_button)
        self.problem = Notice("", "warning")  # a failure, or a question about the output
        self.problem.setAccessibleName("Job problem")
        layout.addLayout(top)
        layout.addLayout(bottom)
        layout.addWidget(self.problem)
        self.clear()

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def run(
        self, job: Job, summary: Callable[[Any], str] | None = None, exists: Rerun | None = None
    ) -> Job:
        """Show and start ``job``; the caller connects to its result signals.

        ``summary(result)`` is the line shown after success (default: how long it took). With
        ``exists``, a job refused because its output exists ends in Replace / Keep both / Cancel
        here, and the answer runs it again through ``exists`` (for that one job). A job replaced by a
        newer one before it ends no longer changes the panel.
        """
        self.job = job
        started = time.monotonic()

        def done(result: Any) -> str:
            return (
                summary(result)
                if summary
                else f"Done in {format_duration(time.monotonic() - started)}."
            )

        def end(text: str) -> None:
            if job is self.job:
                self._end(text)

        def failed(error: JobError) -> None:
            if job is not self.job:
                return
            self._end("")
            if exists is not None and isinstance(error, OutputExistsError):
                self._offer_replace(error, exists)
            else:
                self._show_problem(f"{job.title} failed: {error}")

        job.progress.connect(lambda report: self._on_progress(report) if job is self.job else None)
        job.succeeded.connect(lambda result: end(done(result)))
        job.cancelled.connect(lambda: end("Cancelled: nothing was written."))
        job.failed.connect(failed)
        job.crashed.connect(lambda summary, _: end(f"Stopped by an internal error: {summary}"))
        job.crashed.connect(
            lambda summary, details: dialogs.show_bug(
                self.window(), f"{job.title} stopped", summary, details
            )
        )
        self.problem.hide()
        self.stage.setText(f"{job.title}: starting…")
        self.stage.show()
        self.eta.clear()
        self.bar.setRange(0, 0)  # busy until the first report
        self._show_running(True)
        self.show()
        job.start(self)
        self.started.emit(job)
        return job

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.stage.setText(f"{self.job.title}: cancelling…")

    def clear(self) -> None:
        """Forget the last job's outcome (its input is gone); a running job keeps showing."""
        if not self.running:
            self.problem.hide()
            self.hide()

    def _on_progress(self, report: Progress) -> None:
        if self.job.cancelling:
            return
        self.bar.setRange(0, 1000)
        self.bar.setValue(round(report.fraction * 1000))
        self.stage.setText(status_line(self.job.title, report))
        self.stage.setToolTip(self.stage.text())
        eta = report.eta_seconds
        self.eta.setText(f"{format_duration(eta)} left" if eta is not None else "")

    def _end(self, outcome: str) -> None:
        self.stage.setText(outcome)
        self.stage.setToolTip(outcome)
        self.stage.setVisible(bool(outcome))
        self.eta.clear()
        self._show_running(False)

    def _show_problem(self, text: str, choices: Sequence[tuple[str, str, Callable[[], None]]] = ()) -> None:
        """``text`` as a warning, with ``choices`` (label, tooltip, action) as buttons that answer it."""
        while self.problem.actions.count():  # detached now: an old answer must never be found again
            old = self.problem.actions.takeAt(0).widget()
            old.setParent(None)
            old.deleteLater()
        for label, tip, action in choices:
            button = QPushButton(label)
            button.setToolTip(tip)
            button.clicked.connect(self.problem.hide)
            button.clicked.connect(action)
            self.problem.actions.addWidget(button)
        self.problem.set(text, "warning")
        self.problem.show()

    def _offer_replace(self, error: OutputExistsError, exists: Rerun) -> None:
        other = free_name(error.path)
        self._show_problem(
            f"{error.path.name} already exists in {error.path.parent}.",
            [
                ("Replace", "Write over the existing file, this time only.", lambda: exists(error, True)),
                ("Keep both", f"Save the new file as {other.name}.", lambda: exists(error, False)),
                ("Cancel", "Leave the existing file; nothing is written.", lambda: self._end("Nothing was written.")),
            ],
        )  # fmt: skip

    def _show_running(self, running: bool) -> None:
        self.bar.setVisible(running)
        self.cancel_button.setVisible(running)
        self.cancel_button.setEnabled(running)


def status_line(title: str, report: Progress) -> str:
    """``"Converting · 3.1 GB of 9 GB"``: the job's title, its stage unless that repeats the title
    ("Converting: converting", "Downloading: download"), and the stage's message."""
    line = title if _same_word(title, report.stage) else f"{title}: {report.stage}"
    return f"{line} · {report.message}" if report.message else line


def _same_word(title: str, stage: str) -> bool:
    """Whether the first words share a stem ("Merging" and "merge": four letters or more)."""
    first = [text.split()[0].lower() if text.split() else "" for text in (title, stage)]
    return len(os.path.commonprefix(first)) >= min(4, *map(len, first)) > 0


def free_name(path: Path) -> Path:
    """``model-2.safetensors`` (or -3, …): the first name beside ``path`` that is not taken."""
    number = 2
    while (candidate := path.with_name(f"{path.stem}-{number}{path.suffix}")).exists():
        number += 1
    return candidate
