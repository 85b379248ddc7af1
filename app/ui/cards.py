"""Cards and what goes in them: a titled panel, a job's result, a tinted notice, name/value facts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from app.ui import theme


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
