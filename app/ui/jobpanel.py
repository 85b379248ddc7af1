"""The row every long action gets: what it is doing, a progress bar, time left and a Cancel button."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.ui import dialogs, theme
from app.workers import Job
from engine.jobs import Progress, format_duration


class JobPanel(QWidget):
    """Shows one :class:`Job` at a time; its JobErrors and crashes become dialogs on the window.

    After the job ends the panel keeps a one-line outcome ("Done in 12 s", "Cancelled: nothing was
    written") until the next job starts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.job: Job | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        top = QHBoxLayout()
        self.stage = QLabel()
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
        layout.addLayout(top)
        layout.addLayout(bottom)
        self.hide()

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def run(self, job: Job, summary: Callable[[Any], str] | None = None) -> Job:
        """Show and start ``job``; the caller connects to its result signals.

        ``summary(result)`` is the line shown after success (default: how long it took). A job
        replaced by a newer one before it ends no longer changes the panel.
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

        job.progress.connect(lambda report: self._on_progress(report) if job is self.job else None)
        job.succeeded.connect(lambda result: end(done(result)))
        job.cancelled.connect(lambda: end("Cancelled: nothing was written."))
        job.failed.connect(lambda error: end(f"Failed: {error}"))
        job.crashed.connect(lambda summary, _: end(f"Stopped by an internal error: {summary}"))
        dialogs.report_errors(job, self)
        self.stage.setText(f"{job.title}: starting…")
        self.eta.clear()
        self.bar.setRange(0, 0)  # busy until the first report
        self._show_running(True)
        self.show()
        return job.start(self)

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.stage.setText(f"{self.job.title}: cancelling…")

    def _on_progress(self, report: Progress) -> None:
        if self.job.cancelling:
            return
        self.bar.setRange(0, 1000)
        self.bar.setValue(round(report.fraction * 1000))
        detail = f" · {report.message}" if report.message else ""
        self.stage.setText(f"{self.job.title}: {report.stage}{detail}")
        self.stage.setToolTip(self.stage.text())
        eta = report.eta_seconds
        self.eta.setText(f"{format_duration(eta)} left" if eta is not None else "")

    def _end(self, outcome: str) -> None:
        self.stage.setText(outcome)
        self.stage.setToolTip(outcome)
        self.eta.clear()
        self._show_running(False)

    def _show_running(self, running: bool) -> None:
        self.bar.setVisible(running)
        self.cancel_button.setVisible(running)
        self.cancel_button.setEnabled(running)
