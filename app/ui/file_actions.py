"""What can be done with a file the app lists or made: show it in the system's file manager, copy its
path."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices, QGuiApplication


def show_in_folder(path: Path) -> None:
    """Open the folder holding ``path`` (a diffusers folder: the folder itself)."""
    folder = path if path.is_dir() else path.parent
    QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))


def copy_path(path: Path) -> None:
    """Put ``path``, as text, on the clipboard."""
    QGuiApplication.clipboard().setText(str(path))
