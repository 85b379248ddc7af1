"""The desktop app driven like a user would, on the offscreen platform, through real engine jobs on the
built-in demo model (no mocked engine)."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QPalette
from PySide6.QtWidgets import QApplication, QLabel, QMessageBox, QPushButton

from app import system
from app.settings import Settings
from app.ui.main_window import MainWindow
from app.ui.theme import DARK, LIGHT
from app.workers import Job
from engine.advice import advise
from engine.bench import BenchRequest, run_bench
from engine.bench_result import LAUNCH_BOUND_NOTE, BenchResult, FormatResult, gpu_device
from engine.checkpoint import CheckpointReader
from engine.comfyui import open_install
from engine.convert import ATTENTION_KEY, run_convert
from engine.demo import DEMO_CONFIG, DEMO_FILE, DEMO_LORA_FILE
from engine.export import run_export
from engine.hub import plan_download, plan_summary
from engine.info import inspect_checkpoint
from engine.jobs import JobError
from engine.library import describe_file
from engine.lora import MODES, LoraError, LoraSpec, inspect_lora
from engine.lora.job import default_output
from engine.models.build import model_names, named_config
from engine.models.detect import detect
from engine.models.spec import Architecture, NoModuleError
from tests.app_helpers import WAIT, pick_source
from tests.tiny_checkpoints import write_single_file
from tests.tiny_loras import write_lora


def message_box(qtbot, window, name: str) -> QMessageBox:
    qtbot.waitUntil(lambda: window.findChild(QMessageBox, name) is not None, timeout=WAIT)
    return window.findChild(QMessageBox, name)


# --- Convert ---------------------------------------------------------------------------------------


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


# --- LoRA ------------------------------------------------------------------------------------------


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


# --- Benchmark -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_runs_and_keeps_its_results(qtbot, window, settings):
    page = window.pages["benchmark"]
    window.show_page("benchmark")
    page.set_preset(has_gpu=False)
    page.steps.setValue(1)
    assert page.request().source == "flux2-tiny"
    assert page.request().formats == ("bf16", "int8")
    job = page.run()
    qtbot.waitSignal(job.succeeded, timeout=300_000).wait()
    result = settings.benchmark_results[-1]["result"]
    assert [row["format"] for row in result["rows"]] == ["bf16", "int8"]
    assert page.table.rowCount() == 2 and page.chart.isVisible()
    assert page.table.item(1, 1).text() == f"{result['rows'][1]['seconds_per_step']:.3f}"
    assert [name for name, _ in page.chart.bars] == ["bf16", "int8"]
    assert page.run_facts.text() == "\n".join(BenchResult.from_dict(result).header())
    assert page.run_facts.text().endswith("int8 GEMM: PyTorch float32 matmuls (no int8 speed-up)")
    advice = advise(BenchResult.from_dict(result))  # the same words as `int8-studio bench --advise`
    assert [page.advice.text(), page.advice_basis.text()] == advice.lines()
    assert page.advice.text().startswith("Advice: On the CPU, for ") and page.advice.isVisible()
    assert window.gpu_label.text() == system.CPU_ONLY  # a CPU's times advise no GPU

    again = MainWindow(Settings(Path(settings.store.fileName())))
    qtbot.addWidget(again)
    kept = again.pages["benchmark"]
    assert kept.run_picker.count() == 1 and kept.table.rowCount() == 2
    kept.clear_button.click()
    assert settings.benchmark_results == [] and kept.empty.isVisibleTo(kept)


def test_saved_results_with_notes_and_launch_bound_steps(qtbot, settings):
    """Results saved by an earlier run: a format that did not fit spans its note over the number
    columns, a launch-bound step carries its mark and the footnote, and the table shows every row
    (it is fitted again once the window's style sheet sets the header's height)."""
    rows = (
        FormatResult("bf16", note="does not fit: its weights take 18.2 GB of the 12.0 GB available"),
        FormatResult("int8", 0.071, None, 13.4, 9.9, 0.0293, 0.99956, launch_bound=True),
        FormatResult("int8+compile", 0.031, None, 9.3, 9.6, 0.0298, 0.99955, launch_bound=False),
    )
    result = BenchResult("Klein 9B", "GPU", {}, 512, 1, 10, 1024, 512, "rowwise", 112, 121, rows=rows)
    settings.benchmark_results = [{"title": "a run", "result": result.to_dict()}]
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    window.show_page("benchmark")
    page = window.pages["benchmark"]
    table = page.table
    assert table.columnSpan(0, 1) == table.columnCount() - 1 and table.columnSpan(1, 1) == 1
    assert [table.item(r, 1).text() for r in range(3)] == [rows[0].note, "0.071*", "0.031"]
    assert table.item(1, 1).toolTip() == LAUNCH_BOUND_NOTE
    assert page.run_facts.text() == "\n".join([*result.header(), LAUNCH_BOUND_NOTE])
    headings = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert headings == ["Format", "s/step", "Speed-up", "First call", "Peak VRAM", "Rel. error", "Cosine"]
    header = table.horizontalHeader().height()
    assert table.viewport().height() >= 3 * table.rowHeight(0) and header > 0
    assert not table.verticalScrollBar().isVisible()


def test_benchmark_int8_options_reach_the_request(window):
    page = window.pages["benchmark"]
    page.set_preset(has_gpu=False)
    assert not page.cuda_graphs.isEnabled() and page.request().cuda_graphs is False
    assert page.request().rotate == "none"
    page.rotation.setCurrentIndex(page.rotation.findData("all"))
    assert page.request().rotate == "all"
    assert page.request().attention is None  # as in the file, as `bench` without --attention
    assert page.attention.currentText() == "as in the file"
    page.attention.setCurrentIndex(page.attention.findData("bf16"))
    assert page.request().attention == "bf16"
    page.attention.setCurrentIndex(page.attention.findData("int8"))
    assert page.request().attention == "int8"
    page.set_preset(has_gpu=True)
    page.cuda_graphs.setChecked(True)
    assert page.cuda_graphs.isEnabled() and page.request().cuda_graphs is True


def test_benchmark_runs_on_the_gpu_chosen_in_settings(window, settings, monkeypatch):
    page = window.pages["benchmark"]
    monkeypatch.setattr(system, "gpus", lambda: [system.Gpu(0, "GPU A", 8 << 30, (8, 6)), system.Gpu(1, "GPU B", 24 << 30, (8, 9))])
    settings.gpu_index = 1
    assert page.request().device == "cuda:1"
    settings.gpu_index = 3  # a GPU that is gone: the engine picks
    assert page.request().device is None


def test_gpu_verdicts(monkeypatch):
    from engine.int8 import ops

    ampere, pascal = system.Gpu(0, "A", 8 << 30, (8, 6)), system.Gpu(1, "P", 8 << 30, (6, 1))
    assert ampere.verdict == "INT8 tensor cores: faster than bf16 expected"
    assert pascal.verdict == "no INT8 tensor cores (sm61): INT8 saves memory, speed-up unlikely"
    monkeypatch.setattr(ops, "KERNELS_MISSING", "no module named 'triton'")
    assert ampere.verdict == (
        "INT8 tensor cores, but no Triton 3.4+ for the INT8 kernels: INT8 runs on a slower fallback"
    )
    summary = system.gpu_summary([pascal, ampere], 0)
    assert summary.endswith("INT8 runs on a slower fallback (a guess: not measured yet)")


def test_the_gpu_line_says_the_last_advice_for_this_gpu(qtbot, window, settings, monkeypatch):
    """The status bar's GPU line (and the settings') is the compute-capability guess until a benchmark
    ran on that GPU, then that run's advice; another GPU's runs are not used, clearing brings the guess
    back. The runs are real (tiny, on the CPU) results as that GPU would have named them."""
    gpu = system.Gpu(0, "NVIDIA GeForce RTX 4090", 24 * 10**9, (8, 9))
    other = system.Gpu(1, "B", 8 << 30, (8, 6))
    monkeypatch.setattr(system, "gpus", lambda: [gpu, other])
    window.refresh_hardware()
    guess = f"NVIDIA GeForce RTX 4090 · 24.0 GB VRAM · sm89 · {gpu.verdict} (a guess: not measured yet)"
    assert window.gpu_label.text() == guess
    assert window.gpu_label.toolTip().endswith("Run a benchmark to measure it on this GPU.")
    tiny = BenchRequest("flux2-tiny", resolution=64, steps=1, formats=("bf16", "int8"), device="cpu")
    cpu_run = run_bench(tiny)
    page = window.pages["benchmark"]
    page._on_result(replace(cpu_run, device=gpu_device(other.name, other.capability)))  # the job's success
    assert window.gpu_label.text() == guess
    ours = replace(cpu_run, device=gpu_device(gpu.name, gpu.capability))
    page._on_result(ours)
    advice = advise(ours)
    assert advice.text.startswith("On this NVIDIA GeForce RTX 4090, for Flux.2 tiny at 64², ")
    assert window.gpu_label.text() == f"NVIDIA GeForce RTX 4090 · 24.0 GB VRAM · sm89 · {advice.text}"
    assert [page.advice.text(), page.advice_basis.text()] == advice.lines()
    assert window.gpu_label.toolTip() == "\n".join(advice.lines())
    assert window.pages["settings"].gpu_note.text() == window.gpu_label.text()
    page.clear_button.click()
    assert window.gpu_label.text() == guess


def test_benchmark_keeps_a_form_changed_before_the_gpu_check_finished(window):
    page = window.pages["benchmark"]
    page.set_preset(has_gpu=True)  # what the app shows until the check says otherwise
    page.hardware_found(has_gpu=False)  # untouched: the check's preset applies
    assert (page.request().source, page.request().steps, page.cpu_note.isVisibleTo(page)) == ("flux2-tiny", 3, True)
    page.steps.setValue(7)
    page.hardware_found(has_gpu=True)  # changed by hand: kept, only the GPU-only options follow
    assert (page.request().source, page.request().steps) == ("flux2-tiny", 7)
    assert page.cuda_graphs.isEnabled() and not page.cpu_note.isVisibleTo(page)


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


def test_benchmark_offers_only_models_that_can_run(window):
    def runs(arch: Architecture, config: dict) -> bool:
        try:
            with torch.device("meta"):
                arch.build_module(config)
        except NoModuleError:
            return False
        return True

    choices = window.pages["benchmark"].model
    offered = [choices.itemData(i) for i in range(choices.count())]
    assert offered[-1] is None  # "A file…"
    assert offered[:-1] == [name for name in model_names() if runs(*named_config(name)[:2])]


def test_benchmark_settings_errors_come_from_the_engine(qtbot, window):
    page = window.pages["benchmark"]
    for box in page.format_boxes.values():
        box.setChecked(False)
    with pytest.raises(JobError) as expected:
        run_bench(page.request())
    page.run()
    qtbot.waitUntil(lambda: page.panel.problem.isVisibleTo(page), timeout=WAIT)
    assert page.panel.problem.label.text() == f"Benchmarking failed: {expected.value}"


# --- Library and Export ----------------------------------------------------------------------------


def fake_comfyui(root: Path) -> Path:
    """A ComfyUI git checkout as ComfyUI's own code lays it out (main.py, folder_paths.py, comfy/)."""
    for folder in ("comfy", "models/diffusion_models", "models/loras", "models/unet"):
        (root / folder).mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "folder_paths.py").write_text("")
    return root


def test_tests_never_see_the_real_home(qtbot):
    """A ComfyUI install, settings or a cache in the real home must not change what a test finds
    (tests/conftest.py points HOME and every per-user folder into a temporary folder)."""
    from engine.comfyui import Places, find_installs
    from engine.paths import cache_dir
    fake_home = Path(os.environ["INT8_STUDIO_TESTS_HOME"])
    places = Places.here()
    assert places.home == fake_home and places.roaming.is_relative_to(fake_home)
    assert cache_dir().is_relative_to(fake_home)
    assert Path(Settings().store.fileName()).is_relative_to(fake_home)
    assert find_installs() == []  # nothing in the fake home: a real install is never listed


@pytest.fixture
def comfy_window(qtbot, settings, tmp_path):
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    settings.comfyui_paths = [str(comfy)]
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: bool(window.pages["export"].installs), timeout=WAIT)
    yield window, comfy
    for job in Job.active():
        job.cancel()
    qtbot.waitUntil(lambda: not Job.active(), timeout=WAIT)


def test_library_lists_comfyui_and_own_folders(qtbot, comfy_window, demo, demo_int8, tmp_path):
    window, comfy = comfy_window
    page = window.pages["library"]
    os.link(demo_int8, comfy / "models/diffusion_models" / demo_int8.name)
    lora = write_lora(
        comfy / "models/loras/style.safetensors", "flux2", "kohya", config=DEMO_CONFIG
    )
    page.open_path(demo.parent)  # a dropped folder joins the library
    expected = {
        p: describe_file(p)
        for p in (demo, comfy / "models/diffusion_models" / demo_int8.name, lora.path)
    }
    qtbot.waitUntil(lambda: {e.path for e in page.entries} == set(expected), timeout=WAIT)
    rows = {
        page.table.item(r, 0).text(): [page.table.item(r, c).text() for c in range(1, 4)]
        for r in range(page.table.rowCount())
    }
    for path, entry in expected.items():
        assert rows[path.name] == [entry.kind, entry.model or "—", entry.format or "—"]
    assert str(demo.parent) in window.settings.library_folders

    page.search.setText("lora")
    visible = [r for r in range(page.table.rowCount()) if not page.table.isRowHidden(r)]
    assert [page.table.item(r, 0).text() for r in visible] == ["style.safetensors"]
    page.search.clear()

    row = next(r for r in range(page.table.rowCount()) if page.table.item(r, 0).text() == demo.name)
    page.table.selectRow(row)
    assert page.actions["convert"].isEnabled() and page.actions["benchmark"].isEnabled()
    page.actions["convert"].click()
    assert window.current_page().key == "convert"
    assert window.pages["convert"].source.path() == demo


def test_download_offline_from_a_folder(qtbot, window, demo):
    page = window.pages["library"]
    window.show_page("library")
    page.repo.setText("someone/flux2-klein-demo")
    page.into.set_path(demo.parent)
    page.offline.setChecked(True)
    page.check_download()
    qtbot.waitUntil(lambda: bool(page.plan_label.text()), timeout=WAIT)
    plan = plan_download(page.download_request())
    assert page.plan_label.text() == f"{plan_summary(plan)}\n{plan[0].label}."
    assert page.plan_label.text().startswith("1 file, ") and f"{demo.name} (" in page.plan_label.text()
    assert "; 0 bytes to download\n" in page.plan_label.text() and "already here" in page.plan_label.text()
    job = page.download()
    qtbot.waitSignal(job.finished, timeout=WAIT).wait()
    assert page.downloaded.isVisible() and page.download_model == demo
    page.to_convert.click()
    assert window.current_page().key == "convert" and window.pages["convert"].source.path() == demo
    qtbot.waitUntil(lambda: demo in {e.path for e in page.entries}, timeout=WAIT)


def test_download_errors_come_from_the_engine(qtbot, window, tmp_path):
    page = window.pages["library"]
    page.repo.setText("someone/nothing-here")
    page.into.set_path(tmp_path / "empty")
    page.offline.setChecked(True)
    with pytest.raises(JobError) as expected:
        plan_download(page.download_request())
    page.check_download()
    qtbot.waitUntil(lambda: page.plan_problem.isVisibleTo(page), timeout=WAIT)
    assert page.plan_problem.label.text() == str(expected.value)
    assert not page.plan_label.text() and window.findChild(QMessageBox) is None
    page.repo.setText("someone/another")
    assert not page.plan_problem.isVisibleTo(page)


def test_a_repository_without_a_model_says_what_it_has(qtbot, window, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    for name in ("README.md", "config.json"):
        (folder / name).write_text("{}")
    page = window.pages["library"]
    page.repo.setText("someone/no-model")
    page.into.set_path(folder)
    page.offline.setChecked(True)
    with pytest.raises(JobError) as expected:
        plan_download(page.download_request())
    page.check_download()
    qtbot.waitUntil(lambda: page.plan_problem.isVisibleTo(page), timeout=WAIT)
    assert page.plan_problem.label.text() == str(expected.value)
    assert "someone/no-model" in page.plan_problem.label.text() and ".safetensors" in page.plan_problem.label.text()


def test_export_into_a_comfyui_folder(qtbot, comfy_window, demo_int8):
    window, comfy = comfy_window
    page = window.pages["export"]
    window.open_path("export", demo_int8)
    qtbot.waitUntil(lambda: page.entry is not None, timeout=WAIT)
    assert page.folder.text() == str(comfy / "models/diffusion_models")
    assert page.name.text() == demo_int8.name
    name = f"exported-{random.randint(0, 9999)}.safetensors"
    page.name.setText(name)
    page.link.setChecked(False)  # a copy: a hard link to the source would make it "already there"
    qtbot.mouseClick(page.export_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_notice.isVisible(), timeout=WAIT)
    target = comfy / "models/diffusion_models" / name
    assert page.result.path == target and not page.result.linked
    assert target.read_bytes() == demo_int8.read_bytes()
    assert page.result_notice.label.text() == "E" + page.result.summary[1:] + ". Refresh ComfyUI to see it."
    assert page.result_notice.label.text().startswith(f"Exported {target} (copy, ")  # the CLI's words

    with pytest.raises(JobError):
        run_export(page.request())
    page.export()  # the name is taken: keep both
    qtbot.waitUntil(lambda: page.panel.problem.isVisible(), timeout=WAIT)
    assert page.panel.problem.label.text() == f"{name} already exists in {target.parent}."
    keep = next(b for b in page.panel.problem.findChildren(QPushButton) if b.text() == "Keep both")
    qtbot.mouseClick(keep, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_notice.isVisible(), timeout=WAIT)
    second = target.with_name(target.stem + "-2.safetensors")
    assert page.result.path == second and second.read_bytes() == target.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([name, second.name])


def test_a_lora_is_exported_to_the_lora_folder(qtbot, comfy_window, tmp_path):
    window, comfy = comfy_window
    page = window.pages["export"]
    lora = write_lora(tmp_path / "style.safetensors", "flux2", "comfyui", config=DEMO_CONFIG).path
    window.open_path("export", lora)
    qtbot.waitUntil(lambda: page.kind() == "loras", timeout=WAIT)
    assert page.folder.text() == str(comfy / "models/loras")
    page.export()
    qtbot.waitUntil(lambda: page.result_notice.isVisible(), timeout=WAIT)
    assert (comfy / "models/loras/style.safetensors").read_bytes() == lora.read_bytes()


def test_a_folder_that_is_not_comfyui_is_refused(qtbot, window, tmp_path):
    folder = tmp_path / "not-comfy"
    folder.mkdir()
    with pytest.raises(JobError) as expected:
        open_install(folder)
    window.pages["settings"].add_comfyui(folder)
    box = message_box(qtbot, window, "jobError")
    assert box.text() == str(expected.value)
    assert window.settings.comfyui_paths == []
    assert window.pages["settings"].comfy_list.count() == 0


# --- Window ----------------------------------------------------------------------------------------


def test_closing_during_a_job_asks_then_cancels(qtbot, window, demo):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    job = page.convert()
    window.close()
    box = message_box(qtbot, window, "question")
    assert window.isVisible() and job.running
    with qtbot.waitSignal(job.finished, timeout=WAIT):
        next(b for b in box.buttons() if b.text() == "Cancel and quit").click()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=WAIT)
    assert sorted(p.name for p in demo.parent.iterdir()) == [DEMO_FILE]


def test_keep_working_leaves_the_job_running(qtbot, window, demo):
    page = window.pages["convert"]
    pick_source(qtbot, page, demo)
    job = page.convert()
    window.close()
    box = message_box(qtbot, window, "question")
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
