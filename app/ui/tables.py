"""Read-only tables sized to their rows."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHeaderView, QTableWidget, QWidget


def table(columns: list[str], name: str, stretch: int | None = 0) -> QTableWidget:
    """A read-only table with whole-row selection, left-aligned headers and column ``stretch`` taking
    the spare width (None: the columns fit their contents)."""
    view = QTableWidget(0, len(columns))
    view.setHorizontalHeaderLabels(columns)
    view.setAccessibleName(name)
    view.verticalHeader().hide()
    view.setAlternatingRowColors(True)
    view.setShowGrid(False)
    view.setWordWrap(False)
    view.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
    view.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
    header = view.horizontalHeader()
    header.setDefaultAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    if stretch is not None:
        header.setSectionResizeMode(stretch, QHeaderView.ResizeMode.Stretch)
    header.setHighlightSections(False)
    view.verticalHeader().setDefaultSectionSize(32)
    return view


def fit_rows(view: QTableWidget, least: int = 1, most: int = 12) -> None:
    """Make ``view`` exactly as tall as its rows (at least ``least``, at most ``most`` rows). The header's
    height comes from the style sheet: :func:`refit_tables` fits again after the theme changes."""
    view.setProperty("fit_rows", [least, most])
    rows = min(max(view.rowCount(), least), most)
    header = view.horizontalHeader().sizeHint().height()
    view.setFixedHeight(
        header + rows * view.verticalHeader().defaultSectionSize() + 2 * view.frameWidth()
    )


def refit_tables(root: QWidget) -> None:
    """:func:`fit_rows` again for every table below ``root`` that was fitted: tables filled before the
    window's style sheet was set (saved results shown at start) were fitted to an unstyled header."""
    for view in root.findChildren(QTableWidget):
        if fit := view.property("fit_rows"):
            fit_rows(view, *fit)
