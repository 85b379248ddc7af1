"""Benchmark page: seconds per step of each format on this machine, as a chart and a table ending with
the advice of which format to use (:mod:`engine.advice`), kept between runs so they can be compared."""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidgetItem,
)

from app import system
from app.settings import Settings
from app.ui import theme
from app.ui.cards import Card, Notice
from app.ui.chart import BarChart
from app.ui.forms import action_row, attention_choice, form, muted, primary_button
from app.ui.jobpanel import JobPanel
from app.ui.page import Page
from app.ui.path_fields import PathField
from app.ui.tables import fit_rows, table
from app.workers import Job
from engine.advice import advise
from engine.bench import FORMATS, BenchRequest, bench_defaults, run_bench
from engine.bench_result import COLUMNS, LAUNCH_BOUND_NOTE, BenchResult, cells
from engine.models.build import model_names

FORMAT_HELP = {
    "bf16": "The original precision: the baseline every speed-up is measured against.",
    "bf16+compile": "bf16 through torch.compile: what a tuned ComfyUI setup runs.",
    "fp8": "fp8 weights with row-wise scales (torch._scaled_mm); needs an Ada, Hopper or newer GPU.",
    "int8": "INT8 W8A8: int8 weights and per-token int8 activations on the INT8 tensor cores.",
    "int8+compile": "INT8 W8A8 through torch.compile: usually the fastest.",
}
# the engine's column names, capitalized as the app's headings are ("s/step" is a unit: as it is)
HEADINGS = [name[0].upper() + name[1:] if name[1:2].isalpha() else name for name in COLUMNS]
KEPT_RUNS = 20


class BenchmarkPage(Page):
    key, title, icon_name = "benchmark", "Benchmark", "benchmark"
    subtitle = (
        "Seconds per step for each format on your GPU, with the quality cost next to each speed."
    )

    results_changed = Signal()  # a run was kept or the kept runs cleared: the GPU's advice may change

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        setup = Card("What to measure", icon_name="benchmark")
        fields = form()
        self.model = QComboBox()
        self.model.setAccessibleName("Model to benchmark")
        self.model.setToolTip(
            "A released model size with random weights (nothing to download: speed does not depend "
            "on the weights), or one of your files. Tiny models are quick checks that everything runs."
        )
        for name, (arch, variant) in model_names().items():
            kind = "quick check" if variant.startswith("tiny") else "random weights"
            self.model.addItem(f"{arch.label} {variant} ({kind})", name)
        self.model.addItem("A file…", None)
        self.model.currentIndexChanged.connect(self._on_model)
        self.file = PathField("model", "A .safetensors model or a diffusers folder")
        self.file.setAccessibleName("Model file to benchmark")
        self.file.hide()
        self.resolution = QComboBox()
        self.resolution.setAccessibleName("Resolution")
        self.resolution.setToolTip("Image size: more pixels, more tokens per step.")
        for side in (256, 512, 768, 1024, 1536, 2048):
            self.resolution.addItem(f"{side} × {side}", side)
        self.steps = QSpinBox()
        self.steps.setRange(1, 100)
        self.steps.setAccessibleName("Steps")
        self.steps.setToolTip("Timed steps per format, after warm-up; the median is shown.")
        self.steps.setMaximumWidth(120)
        formats = QHBoxLayout()
        formats.setSpacing(18)
        self.format_boxes: dict[str, QCheckBox] = {}
        for name in FORMATS:
            box = QCheckBox(name)
            box.setToolTip(FORMAT_HELP[name])
            box.setAccessibleName(f"Measure {name}")
            self.format_boxes[name] = box
            formats.addWidget(box)
        formats.addStretch(1)
        self.rotation = QComboBox()
        self.rotation.setAccessibleName("Hadamard rotation of the int8 layers")
        self.rotation.setToolTip(
            "How the int8 formats quantize a float model (an INT8 file runs as it is stored): plain, "
            "or with the down-projections or every layer Hadamard-rotated, as Convert's option does. "
            "Rotation lowers the error column at some speed."
        )
        for label, policy in (("Plain", "none"), ("Down-projections rotated", "down"), ("All rotated", "all")):
            self.rotation.addItem(label, policy)
        self.cuda_graphs = QCheckBox("Replay each step from a CUDA graph")
        self.cuda_graphs.setToolTip(
            "Captures one step and replays it, so the times show GPU work without the host's launch "
            "overhead (what a fully optimized pipeline would see). GPU only."
        )
        int8_options = QHBoxLayout()
        int8_options.setSpacing(18)
        int8_options.addWidget(self.rotation)
        self.attention = attention_choice(as_in_file=True)
        int8_options.addWidget(QLabel("Attention"))
        int8_options.addWidget(self.attention)
        int8_options.addWidget(self.cuda_graphs)
        int8_options.addStretch(1)
        fields.addRow("Model", self.model)
        fields.addRow("", self.file)
        fields.addRow("Resolution", self.resolution)
        fields.addRow("Steps", self.steps)
        fields.addRow("Formats", formats)
        fields.addRow("INT8 options", int8_options)
        setup.body.addLayout(fields)
        self.cpu_note = muted(
            "No CUDA GPU here: the benchmark runs on the CPU, where int8 uses a reference path and "
            "times say nothing about GPU speed. It still shows the quality of each format."
        )
        setup.body.addWidget(self.cpu_note)
        self.run_button = primary_button("Run benchmark", "play")
        self.run_button.setToolTip("Measure every ticked format, one after the other.")
        self.run_button.clicked.connect(self.run)
        setup.body.addLayout(action_row(self.run_button))
        self.panel = JobPanel()
        setup.body.addWidget(self.panel)

        self.results = results = Card("Results", "Shorter bars are faster. Results stay here between runs.")
        self.run_picker = QComboBox()
        self.run_picker.setAccessibleName("Benchmark run")
        self.run_picker.setMinimumWidth(320)
        self.run_picker.currentIndexChanged.connect(self._show_run)
        self.clear_button = QPushButton("Clear")
        theme.bind_icon(self.clear_button, "remove")
        self.clear_button.setToolTip("Forget every kept result.")
        self.clear_button.clicked.connect(self._clear)
        results.header.addWidget(self.run_picker)
        results.header.addWidget(self.clear_button)
        self.run_facts = muted("")
        self.chart = BarChart(unit=COLUMNS[1])  # "s/step", as in the table
        self.table = table(HEADINGS, "Benchmark results", stretch=len(COLUMNS) - 1)
        self.empty = Notice("No results yet.")
        self.advice = QLabel()
        self.advice.setAccessibleName("Advice")
        self.advice.setWordWrap(True)
        self.advice.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.advice_basis = muted("")
        results.body.addWidget(self.empty)
        results.body.addWidget(self.run_facts)
        results.body.addWidget(self.chart)
        results.body.addWidget(self.table)
        results.body.addWidget(self.advice)
        results.body.addWidget(self.advice_basis)

        self.add(setup, results, stretch=True)
        self.set_preset(has_gpu=False)
        self._load_runs()

    def set_preset(self, has_gpu: bool) -> None:
        """Defaults that finish in reasonable time on this machine."""
        preset = bench_defaults(has_gpu)
        self.model.setCurrentIndex(max(0, self.model.findData(preset.source)))
        self.resolution.setCurrentIndex(self.resolution.findData(preset.resolution))
        self.steps.setValue(preset.steps)
        for fmt, box in self.format_boxes.items():
            box.setChecked(fmt in preset.formats)
        self.cuda_graphs.setChecked(False)
        self._show_hardware(has_gpu)
        self._preset = self.request()

    def hardware_found(self, has_gpu: bool) -> None:
        """The GPU check, which finishes after the window opens: its preset replaces the form only if
        nobody has changed the form in the meantime."""
        if self.request() == self._preset:
            self.set_preset(has_gpu)
        else:
            self._show_hardware(has_gpu)

    def _show_hardware(self, has_gpu: bool) -> None:
        self.cpu_note.setVisible(not has_gpu)
        self.cuda_graphs.setEnabled(has_gpu)
        if not has_gpu:
            self.cuda_graphs.setChecked(False)

    def open_path(self, path: Path) -> bool:
        if path.suffix != ".safetensors" and not path.is_dir():
            return False
        self.model.setCurrentIndex(self.model.count() - 1)
        self.file.set_path(path)
        return True

    def _on_model(self) -> None:
        self.file.setVisible(self.model.currentData() is None)

    def request(self) -> BenchRequest:
        source = self.model.currentData() or str(self.file.path() or "")
        return BenchRequest(
            source=source,
            resolution=self.resolution.currentData(),
            steps=self.steps.value(),
            formats=tuple(f for f, box in self.format_boxes.items() if box.isChecked()),
            rotate=self.rotation.currentData(),
            attention=self.attention.currentData(),
            cuda_graphs=self.cuda_graphs.isChecked(),
            device=system.device(self.settings.gpu_index),
        )

    def run(self) -> Job:
        return self.start("Benchmarking", run_bench, self.request(), self.panel, self.run_button, self._on_result)

    def update_ready(self) -> None:
        self.run_button.setEnabled(not self.panel.running)

    # --- results ---------------------------------------------------------------------------------

    def _on_result(self, result: BenchResult) -> None:
        title = f"{time.strftime('%Y-%m-%d %H:%M')} · {result.model} · {result.resolution}²"
        runs = [*self.settings.benchmark_results, {"title": title, "result": result.to_dict()}]
        self.settings.benchmark_results = runs[-KEPT_RUNS:]
        self._load_runs()
        self.reveal(self.results)
        self.results_changed.emit()

    def _load_runs(self) -> None:
        runs = self.settings.benchmark_results
        self.run_picker.blockSignals(True)
        self.run_picker.clear()
        for run in reversed(runs):
            self.run_picker.addItem(run["title"], run["result"])
        self.run_picker.blockSignals(False)
        self.run_picker.setVisible(bool(runs))
        self.clear_button.setVisible(bool(runs))
        self._show_run()

    def _show_run(self) -> None:
        kept = self.run_picker.currentData()
        result = BenchResult.from_dict(kept) if kept else None
        rows = result.rows if result else ()
        for widget in (self.run_facts, self.chart, self.table, self.advice, self.advice_basis):
            widget.setVisible(bool(rows))
        self.empty.setVisible(not rows)
        if not rows:
            return
        bound = any(r.launch_bound for r in rows)
        self.run_facts.setText("\n".join([*result.header(), *[LAUNCH_BOUND_NOTE] * bound]))
        measured = [r for r in rows if r.seconds_per_step is not None]
        self.chart.set_bars([(r.format, r.seconds_per_step) for r in measured])
        self.table.clearSpans()
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            texts = cells(row)
            for c, text in enumerate([*texts, *[""] * (len(COLUMNS) - len(texts))]):
                item = QTableWidgetItem(text)
                item.setToolTip(row.note or (LAUNCH_BOUND_NOTE if row.launch_bound else text))
                self.table.setItem(r, c, item)
            if row.seconds_per_step is None:  # the note spans the number columns, setting no width
                self.table.setSpan(r, 1, 1, len(COLUMNS) - 1)
        fit_rows(self.table)
        text, basis = advise(result).lines()
        self.advice.setText(text)
        self.advice_basis.setText(basis)

    def _clear(self) -> None:
        self.settings.benchmark_results = []
        self._load_runs()
        self.results_changed.emit()

