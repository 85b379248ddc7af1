"""The page frame every page of the main window is built on, and the rule for its main button."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QFrame,
    QLabel,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from app.settings import Settings
from app.ui.jobpanel import JobPanel, free_name
from app.workers import Job
from engine.jobs import OutputExistsError


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
        self,
        title: str,
        fn: Callable[..., Any],
        request: Any,
        panel: JobPanel,
        button: QPushButton,
        done: Callable[[Any], None],
    ) -> Job:
        """Run the job ``fn(request)`` in ``panel`` with ``button`` off until it ends; ``done(result)``
        on success.

        If the output exists, the panel asks: Replace runs this request again with ``overwrite``,
        Keep both with the first free name (:meth:`renamed`). The answer applies to that one run: the
        next job asks again.
        """
        job = Job(title, fn, request)
        job.succeeded.connect(done)
        job.finished.connect(self.update_ready)
        button.setEnabled(False)

        def again(error: OutputExistsError, replace: bool) -> None:
            changed = (
                dataclasses.replace(request, overwrite=True)
                if replace
                else self.renamed(request, free_name(error.path))
            )
            self.start(title, fn, changed, panel, button, done)

        return panel.run(job, exists=again)

    def renamed(self, request: Any, output: Path) -> Any:
        """``request`` writing to ``output`` instead (pages whose request names its output otherwise
        override this)."""
        return dataclasses.replace(request, output=output)

    def reveal(self, widget: QWidget) -> None:
        """Scroll ``widget`` (a result that just appeared) into view once the layout has settled (not at
        all if the page or the widget is gone by then: the timer belongs to the widget)."""
        QTimer.singleShot(50, widget, lambda: self.scroll.ensureWidgetVisible(widget, 0, 24))


def require(
    button: QPushButton,
    needs: list[tuple[str, bool]],
    ready: str,
    busy: bool,
    problems: Sequence[str] = (),
) -> None:
    """Enable ``button`` when every ``(what, met)`` need is met, nothing is wrong and no job runs;
    otherwise its tooltip says what is missing, or the ``problems`` (sentences) that keep it off.
    ``ready`` is its tooltip when it is on."""
    missing = [what for what, met in needs if not met]
    button.setEnabled(not missing and not problems and not busy)
    if missing:
        button.setToolTip(f"First choose {' and '.join(missing)}.")
    else:
        button.setToolTip(" ".join(problems) or ready)
