"""The Library page's table: a name column that keeps its width, the full path on every cell, and
"Show in folder" / "Copy path" for every file (buttons and right-click)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, QUrl, Slot
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import QMenu

from app.ui.library import NAME, NAME_WIDTH
from tests.app_helpers import WAIT


class Opened(QObject):
    """Stands in for the file manager: the URLs Qt was asked to open (QDesktopServices' own hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[QUrl] = []

    @Slot(QUrl)
    def open(self, url: QUrl) -> None:
        self.urls.append(url)


def listed(qtbot, window, path: Path) -> int:
    page = window.pages["library"]
    window.show_page("library")
    page.open_path(path.parent)
    qtbot.waitUntil(lambda: path in {e.path for e in page.entries}, timeout=WAIT)
    return next(r for r in range(page.table.rowCount()) if page.table.item(r, NAME).text() == path.name)


def test_names_take_the_spare_width_and_every_cell_has_the_path(qtbot, window, demo):
    window.resize(1280, 720)
    page = window.pages["library"]
    row = listed(qtbot, window, demo)
    assert page.table.columnWidth(NAME) >= NAME_WIDTH
    header = page.table.horizontalHeader()
    qtbot.waitUntil(lambda: header.length() == page.table.viewport().width(), timeout=WAIT)  # no sideways scroll
    window.resize(1920, 1080)
    qtbot.waitUntil(lambda: header.length() == page.table.viewport().width(), timeout=WAIT)
    assert page.table.columnWidth(NAME) > NAME_WIDTH
    assert all(page.table.item(row, c).toolTip().startswith(str(demo)) for c in range(page.table.columnCount()))


def test_show_in_folder_and_copy_path(qtbot, window, demo):
    page = window.pages["library"]
    row = listed(qtbot, window, demo)
    opened = Opened()
    QDesktopServices.setUrlHandler("file", opened, "open")
    try:
        page.table.selectRow(row)
        page.file_actions["Show in folder"][0].click()
        assert opened.urls == [QUrl.fromLocalFile(str(demo.parent))]
        page.file_actions["Copy path"][0].click()
        assert QGuiApplication.clipboard().text() == str(demo)

        page.table.clearSelection()
        point = page.table.visualItemRect(page.table.item(row, NAME)).center()
        page.table.customContextMenuRequested.emit(point)  # a right-click on the row
        menu = page.table.findChildren(QMenu)[-1]
        qtbot.waitUntil(menu.isVisible, timeout=WAIT)
        labels = [a.text() for a in menu.actions() if a.text()]
        assert labels[:2] == ["Show in folder", "Copy path"] and "Convert" in labels
        next(a for a in menu.actions() if a.text() == "Show in folder").trigger()
        assert opened.urls[-1] == QUrl.fromLocalFile(str(demo.parent))
        menu.close()
    finally:
        QDesktopServices.unsetUrlHandler("file")
