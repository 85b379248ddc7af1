"""The window at the sizes people have: 1280×720 at 100 % (and 1920×1080 at 150 %, the same in
device-independent pixels). Long messages wrap; nothing is pushed out of the window."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QPoint, QRect, QSize
from PySide6.QtWidgets import QAbstractButton

from app.ui.main_window import MINIMUM_SIZE, MainWindow, first_size
from tests.app_helpers import WAIT, pick_source

SMALL_SCREEN = QSize(1280, 720)


def deep_folder(root: Path, length: int) -> Path:
    """A real folder whose path is about ``length`` characters long."""
    folder = root
    while len(str(folder)) < length:
        folder = folder / f"a-rather-long-folder-name-{len(folder.parts)}"
    folder.mkdir(parents=True)
    return folder


def inside(window, widget) -> bool:
    return window.rect().contains(QRect(widget.mapTo(window, QPoint()), widget.size()))


def buttons_outside(window) -> list[str]:
    """The visible buttons of the window's current page and status bar that do not fit across it."""
    page = window.current_page()
    left, right = page.scroll.viewport().mapTo(window, QPoint()).x(), window.width()
    outside = []
    for button in [*page.findChildren(QAbstractButton), *window.statusBar().findChildren(QAbstractButton)]:
        if button.isVisibleTo(window):
            x = button.mapTo(window, QPoint()).x()
            if x < left or x + button.width() > right:
                outside.append(button.text() or button.accessibleName())
    return outside


def test_a_500_character_error_wraps_at_1280x720(qtbot, window, demo, tmp_path):
    window.resize(SMALL_SCREEN)
    page = window.pages["convert"]
    window.show_page("convert")
    pick_source(qtbot, page, demo)
    taken = deep_folder(tmp_path, 480) / "taken.safetensors"
    taken.write_bytes(b"")
    page.output.set_path(taken)
    page.convert()
    qtbot.waitUntil(lambda: page.panel.problem.isVisible(), timeout=WAIT)
    message = page.panel.problem.label.text()
    assert len(message) >= 500

    qtbot.waitUntil(lambda: window.size() == SMALL_SCREEN, timeout=WAIT)
    assert not page.scroll.horizontalScrollBar().isVisible()
    assert page.panel.problem.label.height() > 3 * page.panel.problem.label.fontMetrics().height()  # wrapped
    assert buttons_outside(window) == []
    for choice in page.panel.problem.findChildren(QAbstractButton):  # Replace, Keep both, Cancel
        page.scroll.ensureWidgetVisible(choice)
        qtbot.waitUntil(lambda choice=choice: inside(window, choice), timeout=WAIT)


def test_every_page_fits_the_small_screen(qtbot, window):
    assert MINIMUM_SIZE.width() <= SMALL_SCREEN.width() and MINIMUM_SIZE.height() <= SMALL_SCREEN.height() - 40
    assert window.minimumSizeHint().boundedTo(SMALL_SCREEN) == window.minimumSizeHint()
    window.resize(SMALL_SCREEN)
    for key, page in window.pages.items():
        window.show_page(key)
        qtbot.waitUntil(lambda page=page: not page.scroll.horizontalScrollBar().isVisible(), timeout=WAIT)
        assert buttons_outside(window) == [], key


def test_a_first_window_fits_the_screen(qtbot, settings):
    for available in (QSize(1280, 680), QSize(1280, 720), QSize(1920, 1040)):  # taskbars take some
        size = first_size(available)
        assert size.width() <= available.width() and size.height() <= available.height()
        assert size.expandedTo(MINIMUM_SIZE) == size
    window = MainWindow(settings)
    qtbot.addWidget(window)
    assert window.size() == first_size(window.screen().availableGeometry().size())
