"""The desktop app's Benchmark page and GPU line, on the offscreen platform, through real engine jobs
on the built-in tiny model (no mocked engine): running and keeping results, saved results, the options
that reach the request, the GPU chosen in settings, the GPU verdicts and advice, and errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app import system
from app.settings import Settings
from app.ui.main_window import MainWindow
from engine.advice import advise
from engine.bench import BenchRequest, run_bench
from engine.bench_result import LAUNCH_BOUND_NOTE, BenchResult, FormatResult, gpu_device
from engine.jobs import JobError
from engine.models.build import model_names, named_config
from engine.models.spec import Architecture, NoModuleError
from tests.app_helpers import WAIT


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
