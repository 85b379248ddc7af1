"""What the app's pages remember between jobs: a result belongs to its input, a replace choice to one
job, and a failure is shown once. Real jobs on the demo model, offscreen."""

from __future__ import annotations

import random

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QPushButton

from app.ui.jobpanel import status_line
from engine.demo import DEMO_FILE
from engine.jobs import Progress
from tests.app_helpers import WAIT, pick_source


def answer(qtbot, panel, choice: str) -> None:
    """Press ``choice`` (Replace, Keep both, Cancel) on the panel's output-exists question."""
    qtbot.waitUntil(lambda: panel.problem.isVisible(), timeout=WAIT)
    buttons = panel.problem.findChildren(QPushButton)
    assert [b.text() for b in buttons] == ["Replace", "Keep both", "Cancel"]  # none left from a question before
    qtbot.mouseClick(next(b for b in buttons if b.text() == choice), Qt.MouseButton.LeftButton)


def converted(qtbot, page) -> None:
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)


def test_replace_applies_to_one_job_only(qtbot, window, demo):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    page.convert()
    converted(qtbot, page)
    first = page.result.output
    first.write_bytes(b"stale")  # so a replacement is visible

    page.convert()  # the same output again: asked, then replaced
    answer(qtbot, page.panel, "Replace")
    converted(qtbot, page)
    assert page.result.output == first and first.read_bytes() != b"stale"
    assert window.findChild(QMessageBox) is None

    other = demo.with_name("other.safetensors")
    original = random.randbytes(64)
    other.write_bytes(original)
    page.output.set_path(other)
    page.convert()  # another existing file: asked again, never replaced on the earlier answer
    qtbot.waitUntil(lambda: page.panel.problem.isVisible(), timeout=WAIT)
    assert page.panel.problem.label.text() == f"other.safetensors already exists in {demo.parent}."
    assert other.read_bytes() == original
    answer(qtbot, page.panel, "Keep both")
    converted(qtbot, page)
    assert page.result.output == demo.with_name("other-2.safetensors")
    assert other.read_bytes() == original

    page.convert()  # asked again; Cancel writes nothing
    answer(qtbot, page.panel, "Cancel")
    assert page.panel.stage.text() == "Nothing was written."
    assert sorted(p.name for p in demo.parent.iterdir()) == sorted(
        [DEMO_FILE, first.name, other.name, "other-2.safetensors"]
    )


def test_a_new_input_clears_the_last_result(qtbot, window, demo, tmp_path):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    page.convert()
    converted(qtbot, page)
    assert page.panel.stage.text().startswith("Done in")

    another = tmp_path / "another" / DEMO_FILE
    another.parent.mkdir()
    another.hardlink_to(demo)
    pick_source(qtbot, page, another)
    assert not page.result_card.isVisible() and not page.panel.isVisible()

    page.convert()
    converted(qtbot, page)
    page.output.set_path(tmp_path / "elsewhere.safetensors")
    assert not page.result_card.isVisible() and not page.panel.isVisible()


def test_status_words_never_repeat():
    def line(title: str, stage: str, message: str = "") -> str:
        return status_line(title, Progress(stage, 1, 4, message))

    assert line("Converting", "converting") == "Converting"
    assert line("Merging LoRAs", "merge", "layer 3") == "Merging LoRAs · layer 3"
    assert line("Downloading", "download") == "Downloading"
    assert line("Benchmarking", "benchmark", "int8") == "Benchmarking · int8"
    assert line("Scanning", "library") == "Scanning: library"
    assert line("Installing the INT8 Studio nodes", "Copying the nodes") == (
        "Installing the INT8 Studio nodes: Copying the nodes"
    )


def test_the_convert_status_line_does_not_repeat_itself(qtbot, window, demo):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    job = page.convert()
    seen: list[str] = []
    job.progress.connect(lambda _: seen.append(page.panel.stage.text()))
    converted(qtbot, page)
    assert seen and all(not text.lower().startswith("converting: converting") for text in seen)
