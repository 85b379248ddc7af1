"""The desktop app's main window, on the offscreen platform, through real engine jobs on the built-in
demo model (no mocked engine): closing during a job, page shortcuts and kept settings, dropped files,
crash reports, the theme, the status bar, and `int8-studio app FILE` / `--demo`."""

from __future__ import annotations

import random
from pathlib import Path

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QPalette
from PySide6.QtWidgets import QApplication

from app.settings import Settings
from app.ui.main_window import MainWindow
from app.ui.theme import DARK, LIGHT
from app.workers import Job
from engine.demo import DEMO_CONFIG, DEMO_FILE, DEMO_LORA_FILE
from tests.app_helpers import WAIT, message_box, pick_source
from tests.tiny_loras import write_lora


def close_during_a_conversion(qtbot, window, demo):
    """Start converting ``demo``, then close the window: (the page, the job, the question asked)."""
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    job = page.convert()
    window.close()
    return page, job, message_box(qtbot, window, "question")


def test_closing_during_a_job_asks_then_cancels(qtbot, window, demo):
    _, job, box = close_during_a_conversion(qtbot, window, demo)
    assert window.isVisible() and job.running
    with qtbot.waitSignal(job.finished, timeout=WAIT):
        next(b for b in box.buttons() if b.text() == "Cancel and quit").click()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=WAIT)
    assert sorted(p.name for p in demo.parent.iterdir()) == [DEMO_FILE]


def test_keep_working_leaves_the_job_running(qtbot, window, demo):
    page, job, box = close_during_a_conversion(qtbot, window, demo)
    next(b for b in box.buttons() if b.text() == "Keep working").click()
    qtbot.waitSignal(job.succeeded, timeout=WAIT).wait()
    assert window.isVisible() and page.result_card.isVisible()


def test_shortcuts_switch_pages_and_settings_persist(qtbot, window, settings):
    for number, key in enumerate(window.pages, start=1):
        qtbot.keyClick(window, Qt.Key(Qt.Key.Key_0 + number), Qt.KeyboardModifier.ControlModifier)
        assert window.current_page().key == key
        assert settings.page == key
    height = random.randint(620, 760)  # the offscreen screen is 800 px square: stay inside it
    window.resize(window.width(), height)
    window.close()
    reopened = MainWindow(Settings(Path(settings.store.fileName())))
    qtbot.addWidget(reopened)
    assert reopened.current_page().key == "settings"
    assert reopened.height() == height


def test_a_dropped_file_opens_on_the_page_that_takes_it(qtbot, window, demo):
    window.show_page("settings")  # Settings takes no files: Convert does
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(demo))])
    point = QPointF(window.rect().center())
    buttons, modifiers = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    enter = QDragEnterEvent(point.toPoint(), Qt.DropAction.CopyAction, mime, buttons, modifiers)
    window.dragEnterEvent(enter)
    assert enter.isAccepted()
    window.dropEvent(QDropEvent(point, Qt.DropAction.CopyAction, mime, buttons, modifiers))
    assert window.current_page().key == "convert"
    assert window.pages["convert"].source.path() == demo


def test_a_crash_is_reported_as_a_bug_with_details(qtbot, window):
    def broken(progress=None, cancel=None):
        return {}["missing key"]

    panel = window.pages["convert"].panel
    panel.run(Job("Converting", broken))
    box = message_box(qtbot, window, "bugReport")
    assert box.text().startswith("KeyError: 'missing key'")
    assert "This is a bug in INT8 Studio" in box.text()
    assert "Traceback" in box.detailedText() and "broken" in box.detailedText()
    assert panel.stage.text() == "Stopped by an internal error: KeyError: 'missing key'"


def test_theme_follows_the_setting(qtbot, window, settings):
    page = window.pages["settings"]
    for choice, tokens in (("dark", DARK), ("light", LIGHT)):
        page.theme_combo.setCurrentIndex(page.theme_combo.findData(choice))
        assert settings.theme == choice
        assert f"background: {tokens['bg']};" in QApplication.instance().styleSheet()
        assert (
            QApplication.instance().palette().color(QPalette.ColorRole.Window).name()
            == tokens["bg"]
        )


def test_status_bar_shows_hardware(window):
    window.refresh_hardware()
    text = window.gpu_label.text()
    if window.gpus:
        assert window.gpus[0].name in text and "VRAM" in text
    else:
        assert text == "CPU only: INT8 speed-up needs an NVIDIA GPU"
    assert window.ram_label.text().startswith("RAM ") and " free of " in window.ram_label.text()


def test_app_file_opens_on_the_page_for_that_file(qtbot, settings, demo, demo_int8, tmp_path):
    """`int8-studio app FILE`: a float model on Convert, an INT8 one on Export, a LoRA on LoRA, whichever
    page was used last."""
    import argparse

    from app.__main__ import open_window

    lora = write_lora(tmp_path / "style.safetensors", "flux2", "kohya", config=DEMO_CONFIG).path
    for path, page, field in ((demo, "convert", "source"), (demo_int8, "export", "source"), (lora, "lora", None)):
        settings.page = "benchmark"
        window = open_window(argparse.Namespace(file=path, demo=False), settings)
        qtbot.addWidget(window)
        assert window.current_page().key == page, path
        if field:
            assert getattr(window.pages[page], field).path() == path
        for job in Job.active():
            job.cancel()
        qtbot.waitUntil(lambda: not Job.active(), timeout=WAIT)


def test_app_demo_fills_convert_and_the_lora_page(qtbot, settings):
    """`int8-studio app --demo`: the demo model on Convert, and on the LoRA page with its demo LoRA."""
    import argparse

    from app.__main__ import open_window

    window = open_window(argparse.Namespace(file=None, demo=True), settings)
    qtbot.addWidget(window)
    demo = Path(settings.cache_folder) / "demo" / DEMO_FILE
    lora = window.pages["lora"]
    qtbot.waitUntil(lambda: lora.table.rowCount() == 1 and "layers" in lora.coverage_text(0), timeout=WAIT)
    assert window.current_page().key == "convert" and window.pages["convert"].source.path() == demo
    assert lora.model.path() == demo
    assert lora.stack() == [(demo.with_name(DEMO_LORA_FILE), 1.0)] and lora.merge_button.isEnabled()
    for job in Job.active():
        job.cancel()
    qtbot.waitUntil(lambda: not Job.active(), timeout=WAIT)
