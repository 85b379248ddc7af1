"""Light and dark looks: a palette, the stylesheet in ``assets/style.qss`` and tinted SVG icons.

The stylesheet is written with ``@name`` colour tokens; :func:`apply_theme` fills them from
:data:`LIGHT` or :data:`DARK` and sets the matching :class:`QPalette`, so widgets that paint
themselves (the benchmark chart) can use palette roles and follow the theme too.
"""

from __future__ import annotations

import re
import weakref
from functools import cache
from pathlib import Path

import shiboken6
from PySide6.QtCore import QByteArray, QRectF, Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QImage, QPainter, QPalette, QPixmap
from PySide6.QtSvg import QSvgRenderer
from PySide6.QtWidgets import QApplication, QLabel, QWidget

ASSETS = Path(__file__).resolve().parents[1] / "assets"
THEMES = ("system", "light", "dark")

LIGHT = {
    "bg": "#f4f5f8", "sidebar": "#eceef3", "surface": "#ffffff", "input": "#ffffff",
    "alt_row": "#f8f9fb", "button": "#ffffff", "hover": "#e4e6ee", "pressed": "#d9dce6",
    "border": "#dcdfe7", "border_strong": "#c3c7d3", "text": "#1c1e24", "muted": "#636877",
    "accent": "#5b4cf0", "accent_hover": "#4c3de0", "accent_soft": "#e6e3fe",
    "accent_disabled": "#b9b3f6", "accent_text": "#ffffff",
    "success": "#1f8a3b", "warning": "#a86b00", "danger": "#cf2c2c",
    "notice_bg": "#eef0ff", "notice_border": "#d3d0fb",
    "warning_bg": "#fff6e0", "warning_border": "#f0d9a0",
    "success_bg": "#e9f7ee", "success_border": "#b9e2c5",
}  # fmt: skip
DARK = {
    "bg": "#16171b", "sidebar": "#1c1d22", "surface": "#212329", "input": "#1a1b20",
    "alt_row": "#25272e", "button": "#2a2c34", "hover": "#30323b", "pressed": "#383a45",
    "border": "#2f313a", "border_strong": "#454857", "text": "#e7e8ec", "muted": "#9a9dab",
    "accent": "#7b6cff", "accent_hover": "#8d80ff", "accent_soft": "#2f2b55",
    "accent_disabled": "#463f86", "accent_text": "#ffffff",
    "success": "#4cc06a", "warning": "#e0a93a", "danger": "#ff6b6b",
    "notice_bg": "#23233a", "notice_border": "#38366a",
    "warning_bg": "#2e2716", "warning_border": "#5a4a22",
    "success_bg": "#18291e", "success_border": "#2c5136",
}  # fmt: skip


_current = LIGHT
_bound: list[
    tuple[weakref.ref[QWidget], str, str, int]
] = []  # widgets whose icon follows the theme


def current() -> dict[str, str]:
    """The colour tokens in use (custom-painted widgets read colours from here)."""
    return _current


def system_prefers_dark() -> bool:
    """The desktop's colour scheme (Qt 6.5+); when it is unknown, judge by the default palette."""
    scheme = QGuiApplication.styleHints().colorScheme()
    if scheme != Qt.ColorScheme.Unknown:
        return scheme == Qt.ColorScheme.Dark
    return QGuiApplication.palette().color(QPalette.ColorRole.Window).lightness() < 128


def tokens_for(choice: str) -> dict[str, str]:
    dark = choice == "dark" or (choice == "system" and system_prefers_dark())
    return DARK if dark else LIGHT


def apply_theme(app: QApplication, choice: str = "system") -> dict[str, str]:
    """Style the whole application for ``choice`` ("system", "light" or "dark"); returns the tokens."""
    global _current
    _current = tokens = tokens_for(choice)
    sheet = stylesheet(tokens)
    if app.styleSheet() == sheet:
        return tokens  # restyling repolishes every widget of every window: only when it changed
    if app.style().name() != "fusion":
        app.setStyle("Fusion")
    app.setPalette(_palette(tokens))
    app.setStyleSheet(sheet)
    alive = [entry for entry in _bound if _alive(entry[0]())]
    _bound[:] = alive
    for ref, name, token, size in alive:
        _set_icon(ref(), name, token, size)
    return tokens


def bind_icon(widget: QWidget, name: str, token: str = "muted", size: int = 18) -> None:
    """Give ``widget`` (a button, or a label as a pixmap) the icon ``name`` in the theme colour
    ``token``, and keep it in that colour when the theme changes."""
    _bound.append((weakref.ref(widget), name, token, size))
    _set_icon(widget, name, token, size)


def _set_icon(widget: QWidget, name: str, token: str, size: int) -> None:
    if isinstance(widget, QLabel):
        pixmap = _pixmap(name, _current[token]).scaled(
            size * 2, size * 2, mode=Qt.TransformationMode.SmoothTransformation
        )
        pixmap.setDevicePixelRatio(2)
        widget.setPixmap(pixmap)
    else:
        widget.setIcon(icon(name, _current[token]))


def _alive(widget: QWidget | None) -> bool:
    return widget is not None and shiboken6.isValid(widget)


def stylesheet(tokens: dict[str, str]) -> str:
    text = (ASSETS / "style.qss").read_text(encoding="utf-8")
    values = {**tokens, "icons": (ASSETS / "icons").as_posix()}
    return re.sub(r"@(\w+)", lambda m: values[m.group(1)], text)


def _palette(t: dict[str, str]) -> QPalette:
    p = QPalette()
    role = QPalette.ColorRole
    for r, name in [
        (role.Window, "bg"), (role.WindowText, "text"), (role.Base, "input"),
        (role.AlternateBase, "alt_row"), (role.Text, "text"), (role.Button, "button"),
        (role.ButtonText, "text"), (role.Highlight, "accent"), (role.HighlightedText, "accent_text"),
        (role.ToolTipBase, "surface"), (role.ToolTipText, "text"), (role.PlaceholderText, "muted"),
        (role.Mid, "border"), (role.Dark, "border_strong"), (role.Light, "surface"),
        (role.Link, "accent"), (role.BrightText, "danger"),
    ]:  # fmt: skip
        p.setColor(r, QColor(t[name]))
    p.setColor(QPalette.ColorGroup.Disabled, role.Text, QColor(t["muted"]))
    p.setColor(QPalette.ColorGroup.Disabled, role.ButtonText, QColor(t["muted"]))
    p.setColor(QPalette.ColorGroup.Disabled, role.WindowText, QColor(t["muted"]))
    return p


def icon(name: str, color: str, selected_color: str | None = None) -> QIcon:
    """``assets/icons/<name>.svg`` drawn in ``color`` (and ``selected_color`` when selected)."""
    result = QIcon(_pixmap(name, color))
    if selected_color:
        result.addPixmap(_pixmap(name, selected_color), QIcon.Mode.Selected)
    return result


@cache
def _pixmap(name: str, color: str, size: int = 64) -> QPixmap:
    svg = (ASSETS / "icons" / f"{name}.svg").read_text(encoding="utf-8")
    renderer = QSvgRenderer(QByteArray(svg.replace("currentColor", color).encode()))
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter, QRectF(0, 0, size, size))
    painter.end()
    return QPixmap.fromImage(image)
