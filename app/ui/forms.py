"""Form pieces: the form layout, option tiles, the primary button and its row, muted text."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from app.ui import theme
from engine.int8.choices import ATTENTION_HELP, ATTENTIONS, DEFAULT_ATTENTION


def form() -> QFormLayout:
    """Labels left of their fields, vertically centred on them."""
    layout = QFormLayout()
    layout.setHorizontalSpacing(18)
    layout.setVerticalSpacing(10)
    layout.setLabelAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    layout.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return layout


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


def primary_button(text: str, icon_name: str = "") -> QPushButton:
    """The one button a card is for: accent-coloured, white text and icon."""
    button = QPushButton(text)
    button.setProperty("primary", True)
    button.setCursor(Qt.CursorShape.PointingHandCursor)
    if icon_name:
        theme.bind_icon(button, icon_name, "accent_text")
    return button


def action_row(button: QPushButton) -> QHBoxLayout:
    """The card's primary button, on the right."""
    row = QHBoxLayout()
    row.addStretch(1)
    row.addWidget(button)
    return row


def muted(text: str) -> QLabel:
    label = QLabel(text)
    label.setProperty("muted", True)
    label.setWordWrap(True)
    return label


def attention_choice(as_in_file: bool = False) -> QComboBox:
    """Attention: bf16 | int8, the CLI's ``--attention`` words and help; the engine's default chosen.
    ``as_in_file`` puts first, and chooses, "as in the file" (data None): what ``bench`` does without
    ``--attention``, following an int8 file's own choice."""
    box = QComboBox()
    box.setAccessibleName("Attention")
    box.setToolTip(ATTENTION_HELP[0].upper() + ATTENTION_HELP[1:] + ".")
    if as_in_file:
        box.addItem("as in the file", None)
    for word in ATTENTIONS:
        box.addItem(word, word)
    box.setCurrentIndex(0 if as_in_file else box.findData(DEFAULT_ATTENTION))
    return box
