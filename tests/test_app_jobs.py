"""The jobs indicator in the status bar: the running job, its progress and Cancel from any page, and a
desktop notification when a long job ends while the window is in the background. Real conversions of
the demo model, offscreen."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWidget

from app.ui import jobs_indicator
from engine.demo import DEMO_FILE
from tests.app_helpers import WAIT, pick_source


def test_the_running_job_is_shown_and_cancelled_from_another_page(qtbot, window, demo):
    indicator = window.jobs
    assert not indicator.isVisible()
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    assert not indicator.isVisible()  # reading a header is no job to show
    job = page.convert()
    window.show_page("settings")
    qtbot.waitUntil(lambda: job.last_progress is not None and job.last_progress.stage == "converting", timeout=WAIT)
    assert indicator.isVisible() and indicator.label.text().startswith("Converting")
    assert indicator.bar.maximum() == 1000 and 0 <= indicator.bar.value() <= 1000

    qtbot.mouseClick(indicator.label, Qt.MouseButton.LeftButton)
    assert window.current_page() is page
    window.show_page("library")
    with qtbot.waitSignal(job.cancelled, timeout=WAIT):
        qtbot.mouseClick(indicator.cancel_button, Qt.MouseButton.LeftButton)
    assert not indicator.isVisible()
    assert sorted(p.name for p in demo.parent.iterdir()) == [DEMO_FILE]
    assert page.panel.stage.text() == "Cancelled: nothing was written."


def test_a_long_job_that_ends_in_the_background_is_notified(qtbot, window, demo, monkeypatch):
    monkeypatch.setattr(jobs_indicator, "NOTIFY_AFTER", 0.0)  # the demo converts in a second
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)

    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=WAIT)
    notes: list[tuple[str, str]] = []
    window.jobs.notified.connect(lambda title, text: notes.append((title, text)))
    page.convert()
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)
    assert notes == []  # the user is looking at the window

    elsewhere = QWidget()
    qtbot.addWidget(elsewhere)
    elsewhere.show()
    elsewhere.activateWindow()
    qtbot.waitUntil(lambda: not window.isActiveWindow(), timeout=WAIT)
    page.output.set_path(demo.with_name("second.safetensors"))
    page.convert()
    qtbot.waitUntil(lambda: bool(notes), timeout=WAIT)
    assert notes[0][0] == "Converting: done" and notes[0][1].startswith("Finished in ")
