"""Building blocks shared by the pages: page frame, cards, notices, facts, path fields with drag-and-drop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QDragEnterEvent, QDragLeaveEvent, QDropEvent
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSizePolicy,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from app.settings import Settings
from app.ui import theme
from app.ui.jobpanel import JobPanel
from app.workers import Job


class Page(QWidget):
    """A page of the main window: a title, a one-line subtitle, then cards in a scrolling column.

    Subclasses set ``key`` (settings and shortcuts), ``title``, ``icon_name`` and ``subtitle``.
    ``open_path`` is offered files from Ctrl+O, drag-and-drop on the window and other pages.
    """

    key = ""
    title = ""
    icon_name = ""
    subtitle = ""
    send = Signal(str, object)  # (page key, Path): "open this file on that page"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.setObjectName("page")
        self.setAccessibleName(f"{self.title} page")
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = scroll = QScrollArea()
        scroll.setObjectName("pageScroll")
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        body = QWidget()
        body.setObjectName("pageBody")
        self.column = QVBoxLayout(body)
        self.column.setContentsMargins(32, 26, 32, 26)
        self.column.setSpacing(16)
        heading = QLabel(self.title)
        heading.setObjectName("pageTitle")
        subtitle = QLabel(self.subtitle)
        subtitle.setObjectName("pageSubtitle")
        subtitle.setWordWrap(True)
        self.column.addWidget(heading)
        self.column.addWidget(subtitle)
        self.column.addSpacing(4)
        scroll.setWidget(body)
        outer.addWidget(scroll)

    def add(self, *widgets: QWidget, stretch: bool = False) -> None:
        for widget in widgets:
            self.column.addWidget(widget)
        if stretch:
            self.column.addStretch(1)

    def open_path(self, path: Path) -> bool:
        """Take ``path`` as this page's input; False if the page has no use for files."""
        return False

    def update_ready(self) -> None:
        """Turn the page's main button on once it has what its job needs (pages with one override)."""

    def start(
        self, job: Job, panel: JobPanel, button: QPushButton, done: Callable[[Any], None]
    ) -> Job:
        """Run ``job`` in ``panel`` with ``button`` off until it ends; ``done(result)`` on success."""
        job.succeeded.connect(done)
        job.finished.connect(self.update_ready)
        button.setEnabled(False)
        return panel.run(job)

    def reveal(self, widget: QWidget) -> None:
        """Scroll ``widget`` (a result that just appeared) into view once the layout has settled."""
        QTimer.singleShot(50, lambda: self.scroll.ensureWidgetVisible(widget, 0, 24))


class Card(QFrame):
    """A rounded panel with a title, an optional hint line, and a body layout to fill."""

    def __init__(self, title: str, hint: str = "", icon_name: str = "") -> None:
        super().__init__()
        self.setObjectName("card")
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 18)
        layout.setSpacing(10)
        header = QHBoxLayout()
        header.setSpacing(8)
        if icon_name:
            glyph = QLabel()
            theme.bind_icon(glyph, icon_name, "accent", 18)
            header.addWidget(glyph)
        label = QLabel(title)
        label.setObjectName("cardTitle")
        header.addWidget(label)
        header.addStretch(1)
        self.header = header
        layout.addLayout(header)
        if hint:
            hint_label = QLabel(hint)
            hint_label.setObjectName("cardHint")
            hint_label.setWordWrap(True)
            layout.addWidget(hint_label)
        self.body = QVBoxLayout()
        self.body.setSpacing(10)
        layout.addLayout(self.body)


class ResultCard(Card):
    """What a finished job made: a success line, its facts, and buttons for what to do next.

    ``actions`` are ``(text, icon name, slot)``; the card stays hidden until :meth:`show_result`.
    """

    def __init__(self, actions: list[tuple[str, str, Callable[[], None]]]) -> None:
        super().__init__("Result", icon_name="check")
        self.notice = Notice("", "success")
        self.warning = Notice("", "warning")
        self.facts = Facts()
        row = QHBoxLayout()
        for text, icon_name, slot in actions:
            button = QPushButton(text)
            theme.bind_icon(button, icon_name)
            button.clicked.connect(slot)
            row.addWidget(button)
        row.addStretch(1)
        self.body.addWidget(self.notice)
        self.body.addWidget(self.warning)
        self.body.addWidget(self.facts)
        self.body.addLayout(row)
        self.hide()

    def show_result(self, text: str, facts: list[tuple[str, str]], warnings: Sequence[str] = ()) -> None:
        """``warnings``: what is wrong with the result although the job succeeded, one per line."""
        self.notice.set(text, "success")
        self.warning.set("\n".join(warnings), "warning")
        self.warning.setVisible(bool(warnings))
        self.facts.show_facts(facts)
        self.show()


class Notice(QFrame):
    """A tinted one-paragraph message inside a page: info, warning or success."""

    ICONS: ClassVar[dict[str, tuple[str, str]]] = {
        "info": ("info", "accent"),
        "warning": ("warning", "warning"),
        "success": ("check", "success"),
    }

    def __init__(self, text: str = "", tone: str = "info") -> None:
        super().__init__()
        self.setObjectName("notice")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(14, 10, 14, 10)
        layout.setSpacing(10)
        self.glyph = QLabel()
        self.glyph.setAlignment(Qt.AlignmentFlag.AlignTop)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.label.setOpenExternalLinks(True)
        layout.addWidget(self.glyph)
        layout.addWidget(self.label, 1)
        self.actions = QHBoxLayout()
        layout.addLayout(self.actions)
        self.set(text, tone)

    def set(self, text: str, tone: str = "info") -> None:
        self.label.setText(text)
        self.setProperty("tone", tone)
        self.style().unpolish(self)
        self.style().polish(self)
        theme.bind_icon(self.glyph, *self.ICONS[tone], 18)
        self.setAccessibleDescription(text)


class Choices(QWidget):
    """Mutually exclusive options as tiles side by side: a radio button and a sentence that says
    what choosing it means. The whole tile is clickable."""

    changed = Signal(str)

    def __init__(self, options: dict[str, tuple[str, str]], name: str) -> None:
        super().__init__()
        self.setAccessibleName(name)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(12)
        self.group = QButtonGroup(self)
        self.tiles: dict[str, QFrame] = {}
        for key, (label, description) in options.items():
            tile = QFrame()
            tile.setObjectName("choice")
            tile.mousePressEvent = lambda _, key=key: self.set_value(key)
            column = QVBoxLayout(tile)
            column.setContentsMargins(12, 10, 12, 12)
            column.setSpacing(4)
            button = QRadioButton(label)
            button.setProperty("key", key)
            button.setToolTip(description)
            button.setAccessibleDescription(description)
            self.group.addButton(button)
            column.addWidget(button)
            hint = muted(description)
            hint.setContentsMargins(26, 0, 0, 0)
            column.addWidget(hint)
            column.addStretch(1)
            layout.addWidget(tile, 1)
            self.tiles[key] = tile
        self.group.buttonToggled.connect(self._on_toggled)
        self.set_value(next(iter(options)))

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        # Wrapped descriptions need more height as the tiles get narrower; the form around this
        # widget sizes rows from their size hints, so ask for the height this width needs.
        super().resizeEvent(event)
        needed = self.layout().heightForWidth(event.size().width())
        if needed > 0 and needed != self.minimumHeight():
            self.setMinimumHeight(needed)

    def value(self) -> str:
        return self.group.checkedButton().property("key")

    def set_value(self, key: str) -> None:
        next(b for b in self.group.buttons() if b.property("key") == key).setChecked(True)

    def _on_toggled(self, button: QRadioButton, checked: bool) -> None:
        tile = self.tiles[button.property("key")]
        tile.setProperty("selected", checked)
        tile.style().unpolish(tile)
        tile.style().polish(tile)
        if checked:
            self.changed.emit(button.property("key"))


class Facts(QWidget):
    """Name/value pairs in aligned columns ("Layout  single-file"), ``columns`` pairs a row."""

    def __init__(self, columns: int = 1) -> None:
        super().__init__()
        self.columns = columns
        self.grid = QGridLayout(self)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setHorizontalSpacing(18)
        self.grid.setVerticalSpacing(6)
        for column in range(columns):
            self.grid.setColumnStretch(2 * column + 1, 1)

    def show_facts(self, facts: Iterable[tuple[str, str]]) -> None:
        while self.grid.count():
            self.grid.takeAt(0).widget().deleteLater()
        for index, (name, value) in enumerate(facts):
            row, column = divmod(index, self.columns)
            name_label, value_label = QLabel(name), QLabel(value)
            name_label.setObjectName("factName")
            value_label.setObjectName("fact")
            value_label.setWordWrap(True)
            value_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.grid.addWidget(name_label, row, 2 * column, Qt.AlignmentFlag.AlignTop)
            self.grid.addWidget(value_label, row, 2 * column + 1)

    def text(self) -> str:
        """The facts as "name: value" lines, in the order they were given."""
        labels = [self.grid.itemAt(i).widget().text() for i in range(self.grid.count())]
        return "\n".join(f"{n}: {v}" for n, v in zip(labels[::2], labels[1::2]))


class PathField(QWidget):
    """An editable path with a Browse button, a drop-down of recent choices, and drag-and-drop.

    ``mode`` is "open" (a file, or a folder by drop or typing), "folder" or "save".
    """

    changed = Signal(object)  # Path | None

    def __init__(
        self, mode: str, placeholder: str, file_filter: str = "Safetensors (*.safetensors)"
    ) -> None:
        super().__init__()
        self.mode, self.file_filter = mode, file_filter
        self.start_dir = ""
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(8)
        self.combo = QComboBox()
        self.combo.setEditable(True)
        self.combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.combo.lineEdit().setPlaceholderText(placeholder)
        self.combo.lineEdit().setClearButtonEnabled(True)
        self.combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.combo.setMinimumContentsLength(30)
        self.combo.lineEdit().editingFinished.connect(self._emit)
        self.combo.activated.connect(lambda _: self._emit())
        self.browse = QPushButton("Browse…")
        theme.bind_icon(self.browse, "folder")
        self.browse.clicked.connect(self._browse)
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

    def _browse(self) -> None:
        start = str(self.path() or self.start_dir)
        if self.mode == "folder":
            chosen = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        elif self.mode == "save":
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


def action_row(option: QWidget, button: QPushButton) -> QHBoxLayout:
    """An option on the left, the card's primary button on the right."""
    row = QHBoxLayout()
    row.addWidget(option)
    row.addStretch(1)
    row.addWidget(button)
    return row


def require(button: QPushButton, needs: list[tuple[str, bool]], ready: str, busy: bool) -> None:
    """Enable ``button`` when every ``(what, met)`` need is met and no job runs; otherwise its
    tooltip says what is missing. ``ready`` is its tooltip when it is on."""
    missing = [what for what, met in needs if not met]
    button.setEnabled(not missing and not busy)
    button.setToolTip(f"First choose {' and '.join(missing)}." if missing else ready)


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


def primary_button(text: str, icon_name: str = "") -> QPushButton:
    """The one button a card is for: accent-coloured, white text and icon."""
    button = QPushButton(text)
    button.setProperty("primary", True)
    button.setCursor(Qt.CursorShape.PointingHandCursor)
    if icon_name:
        theme.bind_icon(button, icon_name, "accent_text")
    return button


def table(columns: list[str], name: str, stretch: int = 0) -> QTableWidget:
    """A read-only table with whole-row selection, left-aligned headers and column ``stretch`` taking
    the spare width."""
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


def form() -> QFormLayout:
    """Labels left of their fields, vertically centred on them."""
    layout = QFormLayout()
    layout.setHorizontalSpacing(18)
    layout.setVerticalSpacing(10)
    layout.setLabelAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    layout.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return layout


def muted(text: str) -> QLabel:
    label = QLabel(text)
    label.setProperty("muted", True)
    label.setWordWrap(True)
    return label
