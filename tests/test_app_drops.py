"""Dropping files, as a file manager does it (a real QMimeData of file URLs in real drag events):
every path field gets the local path, never a ``file://`` URL, and the window hands a drop to the
page and field that take it."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QWidget

from app.ui.path_fields import PathField
from app.workers import Job
from engine.demo import DEMO_CONFIG
from tests.app_helpers import WAIT
from tests.tiny_loras import write_lora


def drop(target: QWidget, *paths: Path) -> bool:
    """Drag ``paths`` onto ``target``'s centre and drop them there; whether the drop was taken.
    The events go through Qt's delivery, so they reach the widget that accepts drops, as in a real
    drag."""
    urls = [QUrl.fromLocalFile(str(p)) for p in paths]
    mime = QMimeData()
    mime.setUrls(urls)
    mime.setText("\n".join(url.toString() for url in urls))  # file managers offer the URLs as text too
    point = target.rect().center()
    buttons, modifiers = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    enter = QDragEnterEvent(point, Qt.DropAction.CopyAction, mime, buttons, modifiers)
    QApplication.sendEvent(target, enter)
    if not enter.isAccepted():
        return False
    dropped = QDropEvent(QPointF(point), Qt.DropAction.CopyAction, mime, buttons, modifiers)
    QApplication.sendEvent(target, dropped)
    return dropped.isAccepted()


def test_every_path_field_takes_a_dropped_path(qtbot, window, tmp_path):
    fields = window.findChildren(PathField)
    assert len(fields) >= 6
    for number, field in enumerate(fields):
        path = tmp_path / f"dropped {number}.safetensors"
        path.write_bytes(b"")
        assert drop(field.combo.lineEdit(), path), field.accessibleName()  # onto the text itself
        assert field.combo.currentText() == str(path), field.accessibleName()
        assert field.path() == path
    for job in Job.active():
        job.cancel()
    qtbot.waitUntil(lambda: not Job.active(), timeout=WAIT)


def test_a_drop_on_the_window_fills_the_field_that_takes_it(qtbot, window, demo_int8, tmp_path):
    lora = write_lora(tmp_path / "style.safetensors", "flux2", "kohya", config=DEMO_CONFIG).path
    page = window.pages["lora"]

    window.show_page("settings")  # takes no files: each goes to its own page, the LoRA to LoRA
    assert drop(window.pages["settings"], lora)
    assert window.current_page() is page and page.stack() == [(lora, 1.0)]

    assert drop(page.result_card.parentWidget(), demo_int8)  # anywhere on the page: the model field
    assert page.model.path() == demo_int8 and page.stack() == [(lora, 1.0)]
    qtbot.waitUntil(lambda: "layers" in page.coverage_text(0), timeout=WAIT)
    assert page.merge_button.isEnabled()


def test_a_drop_outside_the_window_s_fields_is_not_text(qtbot, window, tmp_path):
    """The Convert page's drop zone and its source field agree: the path, not its URL."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    page = window.pages["convert"]
    window.show_page("convert")
    assert drop(page.drop_zone, path)
    assert page.source.combo.currentText() == str(path)
