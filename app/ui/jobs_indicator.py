"""The status bar's sign of running jobs, seen from every page: the job, its progress and Cancel; and a
desktop notification when a long job ends while the window is in the background."""

from __future__ import annotations

import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSystemTrayIcon,
    QWidget,
)

from app.ui import theme
from app.ui.jobpanel import status_line
from app.workers import Job
from engine.jobs import format_duration

NOTIFY_AFTER = 10.0  # seconds: a shorter job ends before anyone has looked away


class JobsIndicator(QWidget):
    """The first running job's status (a click shows its page), its progress bar and Cancel, and how
    many more run. Hidden while none runs. Jobs that only read (headers, scans) are not shown."""

    show_page = Signal(str)  # the key of the page the shown job runs on
    notified = Signal(str, str)  # (title, text) of each desktop notification

    def __init__(self) -> None:
        super().__init__()
        self.running: list[tuple[Job, str]] = []  # (job, its page's key), oldest first
        self._tray: QSystemTrayIcon | None = None
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        self.label = QPushButton()
        self.label.setFlat(True)
        self.label.setAccessibleName("Running job")
        self.label.setToolTip("Show the page this job runs on.")
        self.label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.label.setMinimumWidth(120)
        self.label.clicked.connect(lambda: self.show_page.emit(self.running[0][1]))
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setFixedWidth(120)
        self.bar.setAccessibleName("Running job's progress")
        self.cancel_button = QPushButton("Cancel")
        theme.bind_icon(self.cancel_button, "stop")
        self.cancel_button.setAccessibleName("Cancel the running job")
        self.cancel_button.setToolTip("Stop this job now. Whatever it was writing is removed.")
        self.cancel_button.clicked.connect(self._cancel)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.bar)
        layout.addWidget(self.cancel_button)
        self.hide()

    def track(self, job: Job, page: str) -> None:
        """Show ``job`` (run on page ``page``) until it finishes; notify its end if it was long."""
        if job.background:
            return
        started = time.monotonic()
        self.running.append((job, page))

        def took() -> str:
            return format_duration(time.monotonic() - started)

        def notify(title: str, text: str) -> None:
            if time.monotonic() - started >= NOTIFY_AFTER:
                self.notify(title, text)

        job.progress.connect(lambda _: self._refresh())
        job.succeeded.connect(lambda _: notify(f"{job.title}: done", f"Finished in {took()}."))
        job.failed.connect(lambda error: notify(f"{job.title} failed", str(error)))
        job.finished.connect(lambda: self._forget(job))
        self._refresh()

    def notify(self, title: str, text: str) -> None:
        """A desktop notification, if the window is not the active one (the user is elsewhere): the
        system tray's message where the desktop has one, and the window's taskbar entry asks for
        attention either way."""
        window = self.window()
        if window.isActiveWindow():
            return
        if QSystemTrayIcon.isSystemTrayAvailable() and QSystemTrayIcon.supportsMessages():
            if self._tray is None:
                self._tray = QSystemTrayIcon(window.windowIcon(), self)
            self._tray.show()
            self._tray.showMessage(title, text)
        QApplication.alert(window)
        self.notified.emit(title, text)

    def _cancel(self) -> None:
        self.running[0][0].cancel()
        self._refresh()

    def _forget(self, job: Job) -> None:
        self.running = [(j, page) for j, page in self.running if j is not job]
        self._refresh()

    def _refresh(self) -> None:
        self.setVisible(bool(self.running))
        if not self.running:
            return
        job = self.running[0][0]
        report = job.last_progress
        text = status_line(job.title, report) if report else f"{job.title}: starting…"
        if len(self.running) > 1:
            text += f" (+{len(self.running) - 1} more)"
        self.label.setText(text)
        self.bar.setRange(0, 1000 if report else 0)  # busy until the first report
        self.bar.setValue(round(report.fraction * 1000) if report else 0)
        self.cancel_button.setEnabled(not job.cancelling)
