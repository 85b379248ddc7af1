"""Message boxes that never block the event loop.

Each box is opened with ``open()`` (window-modal, returns at once) instead of ``exec()``, so jobs keep
reporting while it is up and tests can find it by object name (``jobError``, ``bugReport``,
``question``) and press its buttons.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QWidget

from app.workers import Job


def _box(parent: QWidget, name: str, icon: QMessageBox.Icon, title: str, text: str) -> QMessageBox:
    box = QMessageBox(icon, title, text, QMessageBox.StandardButton.NoButton, parent)
    box.setObjectName(name)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return box


def report_errors(job: Job, parent: QWidget) -> None:
    """Show ``job``'s JobError as a readable dialog and a crash as a bug report, over ``parent``."""
    job.failed.connect(lambda error: show_error(parent.window(), f"{job.title} failed", str(error)))
    job.crashed.connect(
        lambda summary, details: show_bug(parent.window(), f"{job.title} stopped", summary, details)
    )


def show_error(parent: QWidget, title: str, message: str) -> QMessageBox:
    """A problem with the user's input or machine: the engine's one-line message, nothing more."""
    box = _box(parent, "jobError", QMessageBox.Icon.Warning, title, message)
    box.addButton(QMessageBox.StandardButton.Ok)
    box.open()
    return box


def show_bug(parent: QWidget, title: str, summary: str, details: str) -> QMessageBox:
    """An unexpected exception: say it is our bug, keep the traceback one click away."""
    text = (
        f"{summary}\n\nThis is a bug in INT8 Studio, not something you did. Nothing was written. "
        f"Please report it with the details below."
    )
    box = _box(parent, "bugReport", QMessageBox.Icon.Critical, title, text)
    box.setDetailedText(details)
    box.addButton(QMessageBox.StandardButton.Close)
    box.open()
    return box


def ask(
    parent: QWidget, title: str, text: str, yes: str, no: str, on_yes: Callable[[], None]
) -> QMessageBox:
    """A yes/no question whose answer arrives as a call to ``on_yes`` (nothing happens on no)."""
    box = _box(parent, "question", QMessageBox.Icon.Question, title, text)
    yes_button = box.addButton(yes, QMessageBox.ButtonRole.AcceptRole)
    box.addButton(no, QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(yes_button)
    box.buttonClicked.connect(lambda button: on_yes() if button is yes_button else None)
    box.open()
    return box
