"""Choosing files and folders: a path field with history and Browse, a drop zone, what a drag carries,
and an editable list of paths."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QDragEnterEvent, QDragLeaveEvent, QDropEvent
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QListWidget,
    QMenu,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from app.ui import theme
from app.ui.forms import muted


class PathField(QWidget):
    """An editable path with a Browse button, a drop-down of recent choices, and drag-and-drop.

    ``mode`` is "open" (a file), "model" (a file or a diffusers folder: Browse offers both), "folder"
    or "save". A drop puts the dropped file's local path in the field (the text field inside would
    insert its ``file://`` URL: it takes no drops of its own).
    """

    changed = Signal(object)  # Path | None

    def __init__(
        self, mode: str, placeholder: str, file_filter: str = "Safetensors (*.safetensors)"
    ) -> None:
        super().__init__()
        self.file_filter = file_filter
        self.start_dir = ""
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(8)
        self.combo = QComboBox()
        self.combo.setEditable(True)
        self.combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.combo.lineEdit().setPlaceholderText(placeholder)
        self.combo.lineEdit().setClearButtonEnabled(True)
        self.combo.lineEdit().setAcceptDrops(False)
        self.combo.setAcceptDrops(False)
        self.combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.combo.setMinimumContentsLength(30)
        self.combo.lineEdit().editingFinished.connect(self._emit)
        self.combo.activated.connect(lambda _: self._emit())
        self.browse = QPushButton("Browse…")
        theme.bind_icon(self.browse, "folder")
        if mode == "model":
            menu = QMenu(self.browse)
            menu.addAction("A .safetensors file…", lambda: self._browse("open"))
            menu.addAction("A diffusers folder…", lambda: self._browse("folder"))
            self.browse.setMenu(menu)
        else:
            self.browse.clicked.connect(lambda: self._browse(mode))
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.browse)
        self.setAcceptDrops(True)
        self._last: Path | None = None

    def setAccessibleName(self, name: str) -> None:
        super().setAccessibleName(name)
        self.combo.setAccessibleName(name)
        self.browse.setAccessibleName(f"Browse for {name.lower()}")

    def setToolTip(self, text: str) -> None:
        super().setToolTip(text)
        self.combo.setToolTip(text)

    def path(self) -> Path | None:
        text = self.combo.currentText().strip()
        return Path(text).expanduser() if text else None

    def set_path(self, path: Path | str | None, emit: bool = True) -> None:
        self.combo.setEditText(str(path) if path else "")
        if emit:
            self._emit()
        else:
            self._last = self.path()

    def set_history(self, paths: Iterable[str]) -> None:
        text = self.combo.currentText()
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems(list(paths))
        self.combo.setEditText(text)
        self.combo.blockSignals(False)

    def _emit(self) -> None:
        path = self.path()
        if path != self._last:
            self._last = path
            self.changed.emit(path)

    def _browse(self, mode: str) -> None:
        start = str(self.path() or self.start_dir)
        if mode == "folder":
            chosen = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        elif mode == "save":
            chosen, _ = QFileDialog.getSaveFileName(self, "Save as", start, self.file_filter)
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, "Open", start, self.file_filter)
        if chosen:
            self.set_path(chosen)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if dropped_paths(event):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = dropped_paths(event)
        if paths:
            self.set_path(paths[0])
            event.acceptProposedAction()


class DropZone(QFrame):
    """A dashed frame that takes dropped files and folders and lights up while one is dragged over."""

    dropped = Signal(object)  # Path

    def __init__(self, hint: str) -> None:
        super().__init__()
        self.setObjectName("dropZone")
        self.setAcceptDrops(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 14, 16, 16)
        layout.setSpacing(10)
        layout.addWidget(muted(hint))

    def _hover(self, on: bool) -> None:
        self.setProperty("hover", on)
        self.style().unpolish(self)
        self.style().polish(self)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if dropped_paths(event):
            self._hover(True)
            event.acceptProposedAction()

    def dragLeaveEvent(self, event: QDragLeaveEvent) -> None:
        self._hover(False)

    def dropEvent(self, event: QDropEvent) -> None:
        self._hover(False)
        paths = dropped_paths(event)
        if paths:
            self.dropped.emit(paths[0])
            event.acceptProposedAction()


def dropped_paths(event: QDragEnterEvent | QDropEvent) -> list[Path]:
    """Local files and folders carried by a drag."""
    mime = event.mimeData()
    if not mime.hasUrls():
        return []
    return [Path(url.toLocalFile()) for url in mime.urls() if url.isLocalFile()]


def path_list(name: str, paths: Iterable[str], height: int) -> QListWidget:
    view = QListWidget()
    view.setObjectName("plainList")
    view.setAccessibleName(name)
    view.setMaximumHeight(height)
    view.addItems(list(paths))
    return view


def add_remove_row(
    add_text: str,
    add_tip: str,
    remove_tip: str,
    on_add: Callable[[], None],
    on_remove: Callable[[], None],
) -> QHBoxLayout:
    """An "Add…" and a "Remove" button under a list, left-aligned."""
    row = QHBoxLayout()
    for text, icon_name, tip, slot in (
        (add_text, "add", add_tip, on_add),
        ("Remove", "remove", remove_tip, on_remove),
    ):
        button = QPushButton(text)
        theme.bind_icon(button, icon_name)
        button.setToolTip(tip)
        button.clicked.connect(slot)
        row.addWidget(button)
    row.addStretch(1)
    return row
