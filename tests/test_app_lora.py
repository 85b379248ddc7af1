"""The desktop app's LoRA page driven like a user would, on the offscreen platform, through real
engine jobs on the built-in demo model (no mocked engine): merging a stack, the rounding warning, the
demo LoRA, and a LoRA for another model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton

from app.workers import Job
from engine.checkpoint import CheckpointReader
from engine.demo import DEMO_CONFIG, DEMO_LORA_FILE
from engine.info import inspect_checkpoint
from engine.lora import MODES, LoraError, LoraSpec, inspect_lora
from engine.lora.job import default_output
from engine.models.detect import detect
from tests.app_helpers import WAIT
from tests.tiny_checkpoints import write_single_file
from tests.tiny_loras import write_lora


def test_merge_a_lora_stack_into_the_int8_demo(qtbot, window, demo_int8, tmp_path):
    page = window.pages["lora"]
    formats = random.sample(["kohya", "comfyui", "diffusers", "loha"], 2)
    loras = [
        write_lora(tmp_path / f"{fmt}.safetensors", "flux2", fmt, config=DEMO_CONFIG).path
        for fmt in formats
    ]
    page.open_path(demo_int8)
    for lora in loras:
        window.open_path("lora", lora)
    qtbot.waitUntil(lambda: page.model_info is not None, timeout=WAIT)
    qtbot.waitUntil(lambda: all("layers" in page.coverage_text(r) for r in range(2)), timeout=WAIT)
    assert page.output.path() is None  # the engine names it, as `lora merge` without -o does
    strengths = [round(random.uniform(-1.5, 1.5), 2) for _ in loras]
    for row, strength in enumerate(strengths):
        page.table.cellWidget(row, 1).setValue(strength)
    assert page.mode() == "auto"
    page.modes.set_value(random.choice(MODES))
    assert page.request().loras == tuple(LoraSpec(p, s) for p, s in zip(loras, strengths))
    assert page.merge_button.isEnabled()

    qtbot.mouseClick(page.merge_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)
    with CheckpointReader(demo_int8) as reader:
        assert page.result.output == default_output(detect(reader), reader, page.request().loras)
    assert page.result.output.name == f"demo-int8-{formats[0]}-{formats[1]}.safetensors"
    assert inspect_checkpoint(page.result.output).weight_format == "int8_rowwise"
    assert page.result.tensors_changed > 0
    assert f"Tensors changed: {page.result.tensors_changed}" in page.result_card.facts.text()
    assert "of the LoRA change kept" in page.result_card.facts.text()


def test_a_merge_that_rounds_the_lora_away_shows_a_warning(qtbot, window, demo_int8, tmp_path):
    page = window.pages["lora"]
    lora = write_lora(tmp_path / "small.safetensors", "flux2", "kohya", config=DEMO_CONFIG).path
    window.open_path("lora", demo_int8)
    window.open_path("lora", lora)
    qtbot.waitUntil(lambda: "layers" in page.coverage_text(0), timeout=WAIT)
    page.table.cellWidget(0, 1).setValue(0.01)
    page.modes.set_value("requant")
    qtbot.mouseClick(page.merge_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)
    assert page.result.warnings and page.result_card.warning.isVisibleTo(page.result_card)
    assert page.result_card.warning.label.text() == page.result.warnings[0]
    assert page.result_card.warning.label.text().startswith("requant rounded away")

    page.modes.set_value("auto")
    qtbot.mouseClick(page.merge_button, Qt.MouseButton.LeftButton)
    assert not page.result_card.isVisible()
    qtbot.waitUntil(lambda: page.panel.problem.isVisible(), timeout=WAIT)  # the output exists: replace it
    replace = next(b for b in page.panel.problem.findChildren(QPushButton) if b.text() == "Replace")
    qtbot.mouseClick(replace, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_card.isVisible(), timeout=WAIT)
    assert page.result.stats.modes["stochastic"] > 0 and page.result.warnings == []
    assert not page.result_card.warning.isVisibleTo(page.result_card)


def test_the_demo_model_comes_with_the_demo_lora(qtbot, window, settings, demo_int8):
    page = window.pages["lora"]
    page.open_path(demo_int8)
    qtbot.waitUntil(lambda: page.table.rowCount() == 1 and "layers" in page.coverage_text(0), timeout=WAIT)
    lora = Path(settings.cache_folder) / "demo" / DEMO_LORA_FILE
    info = inspect_lora(lora, demo_int8)
    assert page.stack() == [(lora, 1.0)] and info.target_layers == info.target_linears
    assert page.coverage_text(0).endswith(f": {info.target_linears} of {info.target_linears} layers")
    assert page.merge_button.isEnabled()


def test_other_models_get_no_demo_lora(qtbot, window, tmp_path):
    page = window.pages["lora"]
    page.open_path(write_single_file(tmp_path / "m.safetensors", "flux2").path)
    qtbot.waitUntil(lambda: page.model_info is not None and not Job.active(), timeout=WAIT)  # no demo LoRA job
    assert page.table.rowCount() == 0 and not (tmp_path / "cache" / "demo").exists()


def test_a_lora_for_another_model_is_flagged_and_merge_says_why_it_is_off(qtbot, window, demo_int8, tmp_path):
    page = window.pages["lora"]
    lora = write_lora(tmp_path / "zimage.safetensors", "zimage", "kohya").path
    with pytest.raises(LoraError) as expected:
        inspect_lora(lora, demo_int8)
    page.open_path(demo_int8)
    page.open_path(lora)
    qtbot.waitUntil(lambda: page.coverage_text(0) == str(expected.value), timeout=WAIT)
    assert "Z-Image" in page.coverage_text(0)

    reason = f"zimage.safetensors does not fit this model: {expected.value}. Remove it from the stack to merge."
    assert not page.merge_button.isEnabled()  # off, and why, before anyone clicks
    assert page.merge_button.toolTip() == reason
    assert page.unfit.isVisibleTo(page) and page.unfit.label.text() == reason

    page.table.selectRow(0)
    next(b for b in page.findChildren(QPushButton) if b.text() == "Remove").click()
    assert not page.unfit.isVisibleTo(page) and page.merge_button.toolTip() == "First choose at least one LoRA."
