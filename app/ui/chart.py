"""A horizontal bar chart of seconds per step, painted by hand (QtCharts is not in PySide6-Essentials)."""

from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QFontMetrics, QPainter, QPaintEvent
from PySide6.QtWidgets import QSizePolicy, QWidget

from app.ui import theme

BAR_HEIGHT = 22
GAP = 10


class BarChart(QWidget):
    """Bars of ``(label, value)``; shorter is better, so the best bar gets the accent colour."""

    def __init__(self, unit: str = "s/step") -> None:
        super().__init__()
        self.unit = unit
        self.bars: list[tuple[str, float]] = []
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setAccessibleName("Seconds per step chart")

    def set_bars(self, bars: list[tuple[str, float]]) -> None:
        self.bars = bars
        self.setFixedHeight(max(1, len(bars)) * (BAR_HEIGHT + GAP) + GAP)
        self.setAccessibleDescription(", ".join(f"{n}: {v:.3f} {self.unit}" for n, v in bars))
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        if not self.bars:
            return
        tokens = theme.current()
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        metrics = QFontMetrics(self.font())
        label_width = max(metrics.horizontalAdvance(name) for name, _ in self.bars) + 16
        value_width = metrics.horizontalAdvance(f"00.000 {self.unit}") + 12
        track = max(10.0, self.width() - label_width - value_width)
        longest = max(value for _, value in self.bars) or 1.0
        best = min(value for _, value in self.bars)
        for row, (name, value) in enumerate(self.bars):
            top = GAP + row * (BAR_HEIGHT + GAP)
            text_rect = QRectF(0, top, label_width - 10, BAR_HEIGHT)
            painter.setPen(QColor(tokens["text"]))
            painter.drawText(
                text_rect, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, name
            )
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor(tokens["alt_row"]))
            painter.drawRoundedRect(QRectF(label_width, top, track, BAR_HEIGHT), 5, 5)
            color = tokens["accent"] if value == best else tokens["border_strong"]
            painter.setBrush(QColor(color))
            painter.drawRoundedRect(
                QRectF(label_width, top, track * value / longest, BAR_HEIGHT), 5, 5
            )
            painter.setPen(QColor(tokens["muted"]))
            value_rect = QRectF(label_width + track + 8, top, value_width, BAR_HEIGHT)
            painter.drawText(
                value_rect, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                f"{value:.3f} {self.unit}",
            )  # fmt: skip
        painter.end()
