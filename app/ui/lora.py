"""LoRA page: a stack of LoRAs with strengths, how to merge them, what they cover, merge and save."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QTableWidgetItem,
)

from app.settings import Settings
from app.ui import dialogs, theme
from app.ui.cards import Card, Facts, Notice, ResultCard
from app.ui.forms import Choices, action_row, primary_button
from app.ui.jobpanel import JobPanel
from app.ui.library import page_for_path
from app.ui.page import Page, require
from app.ui.path_fields import PathField, add_remove_row
from app.ui.tables import fit_rows, table
from app.workers import Job
from engine.demo import build_demo_lora, made_from_demo
from engine.info import CheckpointInfo, inspect_checkpoint
from engine.lora import (
    LoraInfo,
    LoraMergeRequest,
    LoraMergeResult,
    LoraSpec,
    MergeStats,
    inspect_lora,
    run_lora_merge,
)

MERGE_MODES = {  # the first is the default
    "auto": (
        "Auto (recommended)",
        (
            "Re-quantizes each layer where that keeps the LoRA's change, and rounds stochastically "
            "where the change is smaller than the int8 step."
        ),
    ),
    "requant": (
        "Re-quantize",
        (
            "Adds the LoRAs in full precision, then rounds to nearest with fresh scales. The lowest "
            "error for large changes, but changes under half an int8 step are dropped (most LoRAs "
            "on tensor-wise models)."
        ),
    ),
    "stochastic": (
        "Keep scales (stochastic rounding)",
        (
            "Adds the LoRAs on the int8 grid at the existing scales, rounding up or down at random "
            "(seeded). Small changes are kept on average, at the cost of noise; untouched weights "
            "stay identical."
        ),
    ),
}
ROUNDED = {"requant": "re-quantized", "stochastic": "rounded stochastically"}  # per mode used
FILE, STRENGTH, COVERAGE = range(3)


def coverage(info: LoraInfo) -> str:
    """What a LoRA changes in the model it was matched against, in words."""
    ranks = "/".join(map(str, info.ranks)) or "—"
    text = f"{info.format}, rank {ranks}: {info.target_layers} of {info.target_linears} layers"
    if info.text_encoder:
        text += f"; {info.text_encoder} text-encoder keys skipped"
    if info.unmatched:
        text += f"; {len(info.unmatched)} keys match no layer"
    return text


def int8_rounding(stats: MergeStats) -> str:
    """The int8 merge in words: modes used, change kept, error against the float merge."""
    used = ", ".join(f"{n} {ROUNDED[m]}" for m, n in sorted(stats.modes.items()))
    text = (
        f"{stats.layers} int8 layers ({used}): {stats.kept:.0%} of the LoRA change kept, rms error "
        f"{stats.relative_error:.0%} of it"
    )
    return text + (f"; {stats.clipped} values clipped" if stats.clipped else "")


class LoraPage(Page):
    key, title, icon_name = "lora", "LoRA", "lora"
    subtitle = "Bake one or more LoRAs into an INT8 model, with their strengths, in one rounding."

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.model_info: CheckpointInfo | None = None

        model = Card("Model", "The INT8 model to merge into (a bf16 model works too).", "file")
        self.model = PathField("model", "Drop a model here or browse")
        self.model.setAccessibleName("Model file")
        self.model.set_history(settings.recent_files)
        self.model.changed.connect(self._on_model)
        self.model_facts = Facts()
        model.body.addWidget(self.model)
        model.body.addWidget(self.model_facts)

        stack = Card(
            "LoRA stack",
            "Each LoRA with its strength (1.0 = as trained, 0.5 = half, negative = opposite). The "
            "whole stack is added up in full precision and rounded once.",
            "lora",
        )
        self.table = table(["LoRA file", "Strength", "Coverage"], "LoRA stack", stretch=COVERAGE)
        fit_rows(self.table, least=2, most=8)
        buttons = add_remove_row(
            "Add LoRA…",
            "Add LoRA files to the stack; you can also drop them on this page.",
            "Take the selected LoRAs out of the stack (the files stay on disk).",
            self._choose_loras,
            self._remove_selected,
        )
        self.unfit = Notice("", "warning")  # why Merge is off, before anyone clicks it
        self.unfit.setAccessibleName("LoRAs that do not fit")
        self.unfit.hide()
        stack.body.addWidget(self.table)
        stack.body.addWidget(self.unfit)
        stack.body.addLayout(buttons)

        options = Card("Merge", icon_name="convert")
        self.modes = Choices(MERGE_MODES, "Merge mode")
        options.body.addWidget(self.modes)
        self.output = PathField(
            "save", "Automatic: next to the model, as <model>-<LoRA>[-<LoRA>…].safetensors"
        )
        self.output.setAccessibleName("Output file")
        self.output.setToolTip(
            "Written to a temporary file first, then renamed: never half a file. Left empty, the "
            "merge names it after the model and its LoRAs."
        )
        self.output.changed.connect(lambda _: self.update_ready())
        self.merge_button = primary_button("Merge and save", "lora")
        self.merge_button.clicked.connect(self.merge)
        self.panel = JobPanel()
        options.body.addWidget(self.output)
        options.body.addLayout(action_row(self.merge_button))
        options.body.addWidget(self.panel)

        self.result_card = ResultCard(
            [("Export to ComfyUI", "export", lambda: self.send.emit("export", self.result.output))]
        )
        self.result: LoraMergeResult | None = None

        self.add(model, stack, options, self.result_card, stretch=True)
        self.update_ready()

    def open_path(self, path: Path) -> bool:
        """A LoRA joins the stack; a model (or a diffusers folder) becomes the model."""
        if path.suffix != ".safetensors" and not path.is_dir():
            return False
        if page_for_path(path) == "lora":
            self.add_lora(path)
        else:
            self.model.set_path(path)
        return True

    # --- model -----------------------------------------------------------------------------------

    def _forget_result(self) -> None:
        """The last merge's result and outcome belong to the model and stack it had."""
        self.result_card.hide()
        self.panel.clear()

    def _on_model(self, path: Path | None) -> None:
        self.model_info = None
        self.model_facts.show_facts([])
        self._forget_result()
        self.update_ready()
        if path is None:
            return
        job = Job.call("Reading the model", inspect_checkpoint, path)
        job.succeeded.connect(lambda info: self._on_model_read(path, info))
        dialogs.report_errors(job, self)
        job.start(self)

    def _on_model_read(self, path: Path, info: CheckpointInfo) -> None:
        if path != self.model.path():
            return
        self.model_info = info
        self.model_facts.show_facts(
            [
                ("Model", info.model or f"not recognised: {info.problem}"),
                ("Weights", info.weight_format or "—"),
            ]
        )
        for row in range(self.table.rowCount()):
            self._check_coverage(row)
        if made_from_demo(info.metadata) and self.table.rowCount() == 0:
            self._add_demo_lora()
        self.update_ready()

    def _add_demo_lora(self) -> None:
        """The demo model comes with a demo LoRA: build it (once) and put it in the empty stack."""
        job = Job("Preparing the demo LoRA", build_demo_lora, self.settings.cache_dir() / "demo")
        job.succeeded.connect(self._on_demo_lora)
        dialogs.report_errors(job, self)
        job.start(self)

    def _on_demo_lora(self, path: Path) -> None:
        if self.table.rowCount() == 0 and self.model_info and made_from_demo(self.model_info.metadata):
            self.add_lora(Path(path))

    # --- stack -----------------------------------------------------------------------------------

    def add_lora(self, path: Path, strength: float = 1.0) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        item = QTableWidgetItem(path.name)
        item.setToolTip(str(path))
        item.setData(Qt.ItemDataRole.UserRole, str(path))
        spin = QDoubleSpinBox()
        spin.setRange(-4.0, 4.0)
        spin.setSingleStep(0.05)
        spin.setValue(strength)
        spin.setAccessibleName(f"Strength of {path.name}")
        spin.setToolTip("1.0 applies the LoRA as trained; 0 turns it off; negative reverses it.")
        self.table.setItem(row, FILE, item)
        self.table.setCellWidget(row, STRENGTH, spin)
        self.table.setItem(row, COVERAGE, QTableWidgetItem("waiting for the model…"))
        fit_rows(self.table, least=2, most=8)
        self._check_coverage(row)
        self._forget_result()
        self.update_ready()

    def stack(self) -> list[tuple[Path, float]]:
        return [
            (
                Path(self.table.item(r, FILE).data(Qt.ItemDataRole.UserRole)),
                self.table.cellWidget(r, STRENGTH).value(),
            )
            for r in range(self.table.rowCount())
        ]

    def coverage_text(self, row: int) -> str:
        return self.table.item(row, COVERAGE).text()

    def _check_coverage(self, row: int) -> None:
        model = self.model.path()
        if self.model_info is None or not self.model_info.model:
            return
        lora = Path(self.table.item(row, FILE).data(Qt.ItemDataRole.UserRole))
        cell = self.table.item(row, COVERAGE)
        cell.setText("checking…")
        job = Job.call("Checking the LoRA", inspect_lora, lora, model)
        cell.setData(Qt.ItemDataRole.UserRole, None)  # fits: unknown until checked
        job.succeeded.connect(lambda info: self._show_coverage(cell, coverage(info), True))
        job.failed.connect(lambda error: self._show_coverage(cell, str(error), False))
        job.crashed.connect(lambda summary, _: self._show_coverage(cell, summary, False))
        job.start(self)

    def _show_coverage(self, cell: QTableWidgetItem, text: str, ok: bool) -> None:
        if self.table.row(cell) < 0:
            return  # removed from the stack meanwhile
        cell.setText(text)
        cell.setToolTip(text)
        cell.setData(Qt.ItemDataRole.UserRole, ok)
        self._tint_coverage(cell)
        self.update_ready()

    def _tint_coverage(self, cell: QTableWidgetItem) -> None:
        """A LoRA that does not fit in the theme's danger colour; one that fits in the table's own
        text colour, so it follows the theme."""
        if cell.data(Qt.ItemDataRole.UserRole) is False:
            cell.setForeground(QBrush(QColor(theme.current()["danger"])))
        else:
            cell.setData(Qt.ItemDataRole.ForegroundRole, None)

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        table = getattr(self, "table", None)  # none yet while the page is being built
        if event.type() == QEvent.Type.PaletteChange and table is not None:  # the theme changed
            for row in range(table.rowCount()):
                self._tint_coverage(table.item(row, COVERAGE))

    def unfit_loras(self) -> list[str]:
        """A sentence for each LoRA in the stack that its check found not to fit the model."""
        return [
            f"{self.table.item(row, FILE).text()} does not fit this model: {self.coverage_text(row)}."
            for row in range(self.table.rowCount())
            if self.table.item(row, COVERAGE).data(Qt.ItemDataRole.UserRole) is False
        ]

    def _choose_loras(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Add LoRAs", self.settings.last_folder, "Safetensors (*.safetensors)"
        )
        for path in paths:
            self.add_lora(Path(path))

    def _remove_selected(self) -> None:
        for row in sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True):
            self.table.removeRow(row)
        fit_rows(self.table, least=2, most=8)
        self._forget_result()
        self.update_ready()

    # --- merge -----------------------------------------------------------------------------------

    def mode(self) -> str:
        return self.modes.value()

    def request(self) -> LoraMergeRequest:
        return LoraMergeRequest(
            model=self.model.path(),
            loras=tuple(LoraSpec(path, strength) for path, strength in self.stack()),
            output=self.output.path(),
            mode=self.mode(),
        )

    def update_ready(self) -> None:
        problems = self.unfit_loras()
        if problems:
            problems.append(f"Remove {'it' if len(problems) == 1 else 'them'} from the stack to merge.")
        self.unfit.set(" ".join(problems), "warning")
        self.unfit.setVisible(bool(problems))
        require(
            self.merge_button,
            [
                ("a model", bool(self.model_info and self.model_info.model)),
                ("at least one LoRA", self.table.rowCount() > 0),
            ],
            "Merge the stack and save the result.",
            self.panel.running,
            problems,
        )

    def merge(self) -> Job:
        self.result_card.hide()
        return self.start(
            "Merging LoRAs", run_lora_merge, self.request(), self.panel, self.merge_button, self._on_merged
        )

    def _on_merged(self, result: LoraMergeResult) -> None:
        self.result = result
        names = ", ".join(m.lora.name for m in result.matches)
        text = f"Merged {names} into {result.model}."
        facts = [("File", str(result.output)), ("Tensors changed", str(result.tensors_changed))]
        if result.stats.layers:
            facts.append(("INT8 rounding", int8_rounding(result.stats)))
        self.result_card.show_result(text, facts, result.warnings)
        self.reveal(self.result_card)
