"""LoRA page: a stack of LoRAs with strengths, how to merge them, what they cover, merge and save."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QButtonGroup,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QPushButton,
    QRadioButton,
    QTableWidgetItem,
)

from app.settings import Settings
from app.ui import theme
from app.ui.jobpanel import JobPanel
from app.ui.widgets import Card, Notice, Page, PathField, muted, primary_button, table
from app.workers import find_job

MERGE_MODES = {
    "requant": (
        "Re-quantize (recommended)",
        (
            "Adds the LoRAs to the weights in full precision, then rounds to int8 again with fresh "
            "scales. The most accurate result; the scales change."
        ),
    ),
    "stochastic": (
        "Keep scales (stochastic rounding)",
        (
            "Adds the LoRAs directly on the int8 grid at the existing scales, rounding each weight up or "
            "down at random in proportion (seeded: the same inputs give the same file). Small LoRA "
            "changes survive on average instead of being rounded away."
        ),
    ),
}


class LoraPage(Page):
    key, title, icon_name = "lora", "LoRA", "lora"
    subtitle = "Bake one or more LoRAs into an INT8 model, with their strengths, in one rounding."

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.missing = Notice(
            "Merging LoRAs is not part of this build yet, so the Merge button stays off. You can "
            "already build the stack; this page will merge it as soon as the LoRA engine lands.",
            "warning",
        )
        self.merge_job = find_job("engine.lora", "run_lora_merge")
        self.missing.setVisible(self.merge_job is None)

        model = Card("Model", "The INT8 model to merge into (or a bf16 model).", "file")
        self.model = PathField("open", "Drop a model here or browse")
        self.model.setAccessibleName("Model file")
        model.body.addWidget(self.model)

        stack = Card(
            "LoRA stack",
            "Each LoRA with its strength (1.0 = as trained, 0.5 = half, negative = opposite). "
            "The whole stack is added up in full precision and rounded once.",
            "lora",
        )
        self.table = table(["LoRA file", "Strength"], "LoRA stack")
        self.table.setMinimumHeight(120)
        self.table.setMaximumHeight(200)
        buttons = QHBoxLayout()
        add, remove = QPushButton("Add LoRA…"), QPushButton("Remove")
        theme.bind_icon(add, "add")
        theme.bind_icon(remove, "remove")
        add.clicked.connect(self._choose_loras)
        remove.clicked.connect(self._remove_selected)
        buttons.addWidget(add)
        buttons.addWidget(remove)
        buttons.addStretch(1)
        stack.body.addWidget(self.table)
        stack.body.addLayout(buttons)

        options = Card("Merge", icon_name="convert")
        self.modes = QButtonGroup(self)
        for index, (key, (label, tip)) in enumerate(MERGE_MODES.items()):
            button = QRadioButton(label)
            button.setToolTip(tip)
            button.setAccessibleDescription(tip)
            button.setProperty("mode", key)
            button.setChecked(index == 0)
            self.modes.addButton(button)
            options.body.addWidget(button)
            options.body.addWidget(muted(tip))
        self.output = PathField("save", "Where to save the merged model")
        self.output.setAccessibleName("Output file")
        options.body.addWidget(self.output)
        actions = QHBoxLayout()
        self.merge_button = primary_button("Merge and save", "lora")
        self.merge_button.setEnabled(False)
        actions.addStretch(1)
        actions.addWidget(self.merge_button)
        options.body.addLayout(actions)
        self.panel = JobPanel()
        options.body.addWidget(self.panel)

        self.add(self.missing, model, stack, options, stretch=True)

    def open_path(self, path: Path) -> bool:
        if path.suffix != ".safetensors" and not path.is_dir():
            return False
        if not self.model.path():
            self.model.set_path(path)
        else:
            self.add_lora(path)
        return True

    def add_lora(self, path: Path, strength: float = 1.0) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        item = QTableWidgetItem(path.name)
        item.setToolTip(str(path))
        item.setData(Qt.ItemDataRole.UserRole, str(path))
        item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
        spin = QDoubleSpinBox()
        spin.setRange(-4.0, 4.0)
        spin.setSingleStep(0.05)
        spin.setValue(strength)
        spin.setAccessibleName(f"Strength of {path.name}")
        self.table.setItem(row, 0, item)
        self.table.setCellWidget(row, 1, spin)

    def stack(self) -> list[tuple[Path, float]]:
        return [
            (
                Path(self.table.item(r, 0).data(Qt.ItemDataRole.UserRole)),
                self.table.cellWidget(r, 1).value(),
            )
            for r in range(self.table.rowCount())
        ]

    def mode(self) -> str:
        return self.modes.checkedButton().property("mode")

    def _choose_loras(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Add LoRAs", self.settings.last_folder, "Safetensors (*.safetensors)"
        )
        for path in paths:
            self.add_lora(Path(path))

    def _remove_selected(self) -> None:
        for row in sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True):
            self.table.removeRow(row)
