"""Benchmark page: seconds per step of each format on this machine, as a chart and a table, kept
between runs so they can be compared."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QTableWidgetItem,
)

from app.settings import Settings
from app.ui import theme
from app.ui.chart import BarChart
from app.ui.jobpanel import JobPanel
from app.ui.widgets import Card, Notice, Page, PathField, form, primary_button, table
from app.workers import find_job
from engine.models import REGISTRY

FORMATS = {
    "bf16": "The original precision: the baseline every speed-up is measured against.",
    "bf16+compile": "bf16 through torch.compile: what a tuned ComfyUI setup runs.",
    "fp8": "fp8 weights with row-wise scales (torch._scaled_mm); needs an Ada, Hopper or newer GPU.",
    "int8": "INT8 W8A8: int8 weights and per-token int8 activations on the INT8 tensor cores.",
    "int8+compile": "INT8 W8A8 through torch.compile: usually the fastest.",
}
COLUMNS = ["Format", "s/it", "Speed-up", "Rel. error", "Cosine", "Peak VRAM", "Compile"]


class BenchmarkPage(Page):
    key, title, icon_name = "benchmark", "Benchmark", "benchmark"
    subtitle = (
        "Seconds per step for each format on your GPU, with the quality cost next to each speed."
    )

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.missing = Notice(
            "The benchmark engine is not part of this build yet, so nothing can be measured here. "
            "This page will run it as soon as it lands; every number it shows will be measured on "
            "this machine, never estimated.",
            "warning",
        )
        self.bench_job = find_job("engine.bench", "run_bench")
        self.missing.setVisible(self.bench_job is None)

        setup = Card("What to measure", icon_name="benchmark")
        fields = form()
        self.variant = QComboBox()
        self.variant.setAccessibleName("Model to benchmark")
        self.variant.setToolTip(
            "A released model size with random weights (no download needed: speed does not depend on "
            "the weights), or one of your files for the quality numbers too."
        )
        for arch in REGISTRY.values():
            for variant in arch.variants:
                self.variant.addItem(
                    f"{arch.label} {variant} (random weights)", (arch.name, variant)
                )
        self.variant.addItem("A file…", None)
        self.variant.currentIndexChanged.connect(self._on_variant)
        self.file = PathField("open", "A .safetensors model")
        self.file.setAccessibleName("Model file to benchmark")
        self.file.hide()
        self.resolution = QComboBox()
        self.resolution.setAccessibleName("Resolution")
        for side in (512, 768, 1024, 1536, 2048):
            self.resolution.addItem(f"{side} × {side}", side)
        self.resolution.setCurrentIndex(2)
        self.resolution.setToolTip("Image size: more pixels means more tokens per step.")
        self.steps = QSpinBox()
        self.steps.setRange(1, 100)
        self.steps.setValue(10)
        self.steps.setAccessibleName("Steps")
        self.steps.setToolTip(
            "Timed steps per format, after warm-up. More steps, steadier numbers."
        )
        formats = QHBoxLayout()
        formats.setSpacing(18)
        self.format_boxes: dict[str, QCheckBox] = {}
        for name, tip in FORMATS.items():
            box = QCheckBox(name)
            box.setChecked(True)
            box.setToolTip(tip)
            box.setAccessibleName(f"Measure {name}")
            self.format_boxes[name] = box
            formats.addWidget(box)
        formats.addStretch(1)
        fields.addRow("Model", self.variant)
        fields.addRow("", self.file)
        fields.addRow("Resolution", self.resolution)
        fields.addRow("Steps", self.steps)
        fields.addRow("Formats", formats)
        setup.body.addLayout(fields)
        actions = QHBoxLayout()
        self.run_button = primary_button("Run benchmark", "play")
        self.run_button.setEnabled(self.bench_job is not None)
        self.run_button.setToolTip("Measure every ticked format, one after the other.")
        actions.addStretch(1)
        actions.addWidget(self.run_button)
        setup.body.addLayout(actions)
        self.panel = JobPanel()
        setup.body.addWidget(self.panel)

        results = Card("Results", "Shorter bars are faster. Results stay here between runs.")
        self.run_picker = QComboBox()
        self.run_picker.setAccessibleName("Benchmark run")
        self.run_picker.currentIndexChanged.connect(self._show_run)
        self.clear_button = QPushButton("Clear")
        theme.bind_icon(self.clear_button, "remove")
        self.clear_button.setToolTip("Forget every kept result.")
        self.clear_button.clicked.connect(self._clear)
        results.header.addWidget(self.run_picker)
        results.header.addWidget(self.clear_button)
        self.chart = BarChart()
        self.table = table(COLUMNS, "Benchmark results")
        self.empty = Notice("No results yet.")
        results.body.addWidget(self.empty)
        results.body.addWidget(self.chart)
        results.body.addWidget(self.table)

        self.add(self.missing, setup, results, stretch=True)
        self._load_runs()

    def open_path(self, path: Path) -> bool:
        if path.is_dir() or path.suffix != ".safetensors":
            return False
        self.variant.setCurrentIndex(self.variant.count() - 1)
        self.file.set_path(path)
        return True

    def _on_variant(self) -> None:
        self.file.setVisible(self.variant.currentData() is None)

    def _load_runs(self) -> None:
        runs = self.settings.benchmark_results
        self.run_picker.blockSignals(True)
        self.run_picker.clear()
        for run in reversed(runs):
            self.run_picker.addItem(run["title"], run)
        self.run_picker.blockSignals(False)
        self.run_picker.setVisible(bool(runs))
        self.clear_button.setVisible(bool(runs))
        self._show_run()

    def _show_run(self) -> None:
        run = self.run_picker.currentData()
        rows = run["rows"] if run else []
        self.empty.setVisible(not rows)
        self.chart.setVisible(bool(rows))
        self.table.setVisible(bool(rows))
        self.chart.set_bars([(row["format"], row["seconds_per_step"]) for row in rows])
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(_cells(row)):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.setFixedHeight(
            self.table.horizontalHeader().sizeHint().height() + 32 * len(rows) + 4
        )

    def _clear(self) -> None:
        self.settings.benchmark_results = []
        self._load_runs()


def _cells(row: dict) -> list[str]:
    def number(key: str, fmt: str, suffix: str = "") -> str:
        value = row.get(key)
        return "—" if value is None else f"{value:{fmt}}{suffix}"

    return [
        row["format"],
        number("seconds_per_step", ".3f"),
        number("speedup", ".2f", "×"),
        number("relative_error", ".2%"),
        number("cosine", ".5f"),
        number("peak_vram_gb", ".1f", " GB"),
        number("compile_seconds", ".0f", " s"),
    ]
