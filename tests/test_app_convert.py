"""The desktop app's Convert page driven like a user would, on the offscreen platform, through real
engine jobs on the built-in demo model (no mocked engine): converting, the options that reach the
engine, cancelling, refusals, and the first launch's demo offer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QMessageBox

from app.ui.main_window import MainWindow
from engine.checkpoint import CheckpointReader
from engine.convert import ATTENTION_KEY, run_convert
from engine.demo import DEMO_FILE
from engine.info import inspect_checkpoint
from engine.jobs import JobError
from tests.app_helpers import WAIT, pick_source


def test_convert_the_demo_model(qtbot, window, demo):
    page = window.pages["convert"]
    window.show_page("convert")
    assert not page.convert_button.isEnabled()
    assert page.convert_button.toolTip() == "First choose a supported source checkpoint."
    pick_source(qtbot, page, demo)
    assert page.info.model.startswith("Flux.2")
    assert "bf16" in page.facts.text()
    scheme = random.choice(["rowwise", "tensorwise"])
    page.schemes.set_value(scheme)
    assert page.convert_button.isEnabled()

    qtbot.mouseClick(page.convert_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)

    output = demo.with_name(f"{demo.stem}-int8-{scheme}.safetensors")
    assert page.result.output == output
    info = inspect_checkpoint(output)
    assert info.weight_format == f"int8_{scheme}"
    assert str(output) in page.result_card.facts.text()
    assert page.panel.stage.text().startswith("Done in")
    assert str(demo) in window.settings.recent_files


def test_keep_presets_reach_the_engine(qtbot, window, demo):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    page.keep_preset.setCurrentIndex(page.keep_preset.findData("first-blocks"))
    assert page.request().keep == ("double_blocks.0.*", "single_blocks.0.*")
    assert page.keep_patterns.placeholderText() == "e.g. double_blocks.0.*  single_blocks.0.*"
    page.keep_preset.setCurrentIndex(page.keep_preset.findData("custom"))
    assert page.keep_patterns.isVisible()
    page.keep_patterns.setText("double_blocks.1.*, single_blocks.3.*")
    assert page.request().keep == ("double_blocks.1.*", "single_blocks.3.*")

    page.convert()
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)
    with CheckpointReader(page.result.output) as reader:
        dtypes = {name: t.dtype for name, t in reader.tensors.items() if name.endswith(".weight")}
    kept = [n for n in dtypes if n.startswith(("double_blocks.1.", "single_blocks.3."))]
    assert kept and all(dtypes[n] != "I8" for n in kept)
    assert any(d == "I8" for n, d in dtypes.items() if n.startswith("double_blocks.0."))


def test_attention_choice_reaches_the_converted_file(qtbot, window, demo):
    page = window.pages["convert"]
    assert page.attention.currentData() == "bf16" and page.request().attention == "bf16"
    assert page.attention.toolTip().startswith("Attention in bf16 (SDPA) or int8")
    pick_source(qtbot, page, demo)
    page.attention.setCurrentIndex(page.attention.findData("int8"))
    assert page.request().attention == "int8"

    page.convert()
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)
    with CheckpointReader(page.result.output) as reader:
        assert reader.metadata[ATTENTION_KEY] == "int8"


def test_cancel_mid_conversion_leaves_nothing_behind(qtbot, window, demo):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    job = page.convert()
    qtbot.waitUntil(
        lambda: job.last_progress is not None and job.last_progress.stage == "converting",
        timeout=WAIT,
    )
    with qtbot.waitSignal(job.cancelled, timeout=WAIT):
        qtbot.mouseClick(page.panel.cancel_button, Qt.MouseButton.LeftButton)
    assert sorted(p.name for p in demo.parent.iterdir()) == [DEMO_FILE]
    assert page.panel.stage.text() == "Cancelled: nothing was written."
    assert not page.result_card.isVisible()
    assert page.convert_button.isEnabled()


def test_unreadable_file_shows_the_engines_message_once(qtbot, window, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(random.randbytes(random.randint(1, 4000)))
    with pytest.raises(JobError) as expected:
        inspect_checkpoint(bad)
    page = window.pages["convert"]
    page.open_path(bad)
    qtbot.waitUntil(lambda: page.source_problem.isVisible(), timeout=WAIT)
    assert page.source_problem.label.text() == str(expected.value)
    assert not page.convert_button.isEnabled()
    assert window.findChild(QMessageBox) is None  # shown once: beside the field, not also in a dialog
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "settings.ini"]


def test_existing_output_is_refused_in_place(qtbot, window, demo):
    output = demo.with_name("taken.safetensors")
    original = random.randbytes(100)
    output.write_bytes(original)
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    page.output.set_path(output)
    with pytest.raises(JobError) as expected:
        run_convert(page.request())
    assert str(expected.value) == f"{output} already exists; choose another name or replace it"
    page.convert()
    qtbot.waitUntil(lambda: page.panel.problem.isVisible(), timeout=WAIT)
    assert page.panel.problem.label.text() == f"taken.safetensors already exists in {demo.parent}."
    assert window.findChild(QMessageBox) is None
    assert output.read_bytes() == original
    assert sorted(p.name for p in demo.parent.iterdir()) == sorted([DEMO_FILE, output.name])


def test_int8_source_is_refused_before_converting(qtbot, window, demo):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    page.convert()
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)
    pick_source(qtbot, page, page.result.output)
    qtbot.waitUntil(lambda: page.source_problem.isVisible(), timeout=WAIT)
    assert "already INT8" in page.source_problem.label.text()
    assert not page.convert_button.isEnabled()


def test_first_launch_offers_the_demo_model(qtbot, window, settings):
    page = window.pages["convert"]
    assert page.demo_offer.isVisible()
    qtbot.mouseClick(page.demo_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.info is not None, timeout=WAIT)
    assert page.source.path() == Path(settings.cache_folder) / "demo" / DEMO_FILE
    assert not page.demo_offer.isVisible()
    assert page.convert_button.isEnabled()
    again = MainWindow(settings)
    qtbot.addWidget(again)
    assert not again.pages["convert"].demo_offer.isVisibleTo(again)


def test_convert_rotation_choice_reaches_the_request_and_the_output_name(window):
    page = window.pages["convert"]
    assert page.request().rotate == "none"
    page.rotations.set_value("down")
    assert page.request().rotate == "down"
    assert page.output.combo.lineEdit().placeholderText().endswith("-int8-rowwise-rotdown.safetensors")


@pytest.mark.parametrize("width", [1000, 1280, 1600])
def test_choice_tiles_are_tall_enough_for_their_wrapped_text(qtbot, window, width):
    """Narrow windows wrap the descriptions onto more lines: no tile may cut them off."""
    window.show_page("convert")
    window.resize(width, 900)
    page = window.pages["convert"]
    hints = [label for choices in (page.schemes, page.rotations) for tile in choices.tiles.values()
             for label in tile.findChildren(QLabel)]  # fmt: skip

    def fits() -> bool:
        return all(label.height() >= label.heightForWidth(label.width()) for label in hints)

    qtbot.waitUntil(fits, timeout=WAIT)
