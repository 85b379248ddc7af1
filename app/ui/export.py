"""Export page: put a converted or merged file into a ComfyUI models folder, verified."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QRadioButton,
)

from app.settings import Settings
from app.ui import dialogs, theme
from app.ui.cards import Card, Facts, Notice
from app.ui.forms import action_row, form, primary_button
from app.ui.jobpanel import JobPanel
from app.ui.node_pack import NodePackRow
from app.ui.page import Page, require
from app.ui.path_fields import PathField
from app.workers import Job
from engine.checkpoint import format_bytes
from engine.comfyui import ComfyInstall, ComfyUIError, find_installs
from engine.export import ExportRequest, ExportResult, run_export
from engine.library import LibraryEntry, describe_file, export_kind

KINDS = {
    "diffusion_models": (
        "Diffusion model",
        "models/diffusion_models: where ComfyUI's Load Diffusion Model node looks.",
    ),
    "loras": ("LoRA", "models/loras: where ComfyUI's LoRA loaders look."),
}


class ExportPage(Page):
    key, title, icon_name = "export", "Export", "export"
    subtitle = (
        "Put a converted or merged file into your ComfyUI models folder, verified on arrival."
    )
    installs_found = Signal(object)  # list[ComfyInstall]

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.installs: list[ComfyInstall] = []
        self.entry: LibraryEntry | None = None

        source = Card("File", icon_name="file")
        self.source = PathField("open", "Drop a converted model or a LoRA here, or browse")
        self.source.setAccessibleName("File to export")
        self.source.set_history(settings.recent_files)
        self.source.changed.connect(self._on_source)
        self.source_facts = Facts()
        source.body.addWidget(self.source)
        source.body.addWidget(self.source_facts)

        target = Card("ComfyUI", icon_name="comfyui")
        self.none_found = Notice(
            "No ComfyUI install found yet. Add your ComfyUI folder (the one with main.py, or ComfyUI "
            "Desktop's base path) and it will be remembered.",
            "warning",
        )
        self.add_install = QPushButton("Add ComfyUI folder…")
        theme.bind_icon(self.add_install, "add", "accent")
        self.none_found.actions.addWidget(self.add_install)
        self.none_found.hide()
        fields = form()
        install_row = QHBoxLayout()
        install_row.setSpacing(8)
        self.install = QComboBox()
        self.install.setAccessibleName("ComfyUI install")
        self.install.setToolTip(
            "Installs found on this computer, and the folders you added in Settings."
        )
        self.install.currentIndexChanged.connect(self._update_target)
        self.refresh = QPushButton("Refresh")
        theme.bind_icon(self.refresh, "refresh")
        self.refresh.setToolTip("Look for ComfyUI installs again.")
        self.refresh.clicked.connect(self.find)
        install_row.addWidget(self.install, 1)
        install_row.addWidget(self.refresh)
        kinds = QHBoxLayout()
        kinds.setSpacing(22)
        self.kind_group = QButtonGroup(self)
        for index, (kind, (label, tip)) in enumerate(KINDS.items()):
            button = QRadioButton(label)
            button.setProperty("kind", kind)
            button.setToolTip(tip)
            button.setChecked(index == 0)
            self.kind_group.addButton(button)
            kinds.addWidget(button)
        kinds.addStretch(1)
        self.kind_group.buttonToggled.connect(lambda *_: self._update_target())
        self.folder = QLineEdit()
        self.folder.setReadOnly(True)
        self.folder.setAccessibleName("Target folder")
        self.folder.setToolTip(
            "Chosen from the install: its default folder for new files of this kind."
        )
        self.name = QLineEdit()
        self.name.setAccessibleName("File name in ComfyUI")
        self.name.setToolTip("The name ComfyUI will list. Keep .safetensors at the end.")
        fields.addRow("Install", install_row)
        fields.addRow("Kind", kinds)
        fields.addRow("Folder", self.folder)
        fields.addRow("Name", self.name)
        self.link = QCheckBox("Hard-link when on the same disk")
        self.link.setChecked(True)
        self.link.setToolTip(
            "On the same disk the file appears in ComfyUI at once and takes no extra space; "
            "elsewhere it is copied. Either way it is verified before it gets its name."
        )
        fields.addRow("", self.link)
        target.body.addWidget(self.none_found)
        target.body.addLayout(fields)
        self.export_button = primary_button("Export to ComfyUI", "export")
        self.export_button.clicked.connect(self.export)
        self.panel = JobPanel()
        target.body.addLayout(action_row(self.export_button))
        target.body.addWidget(self.panel)
        self.node_pack = NodePackRow()  # the INT8 Studio nodes in the chosen install: status, one button
        target.body.addWidget(self.node_pack)

        self.result_notice = Notice("", "success")
        self.result_notice.hide()
        self.result: ExportResult | None = None

        self.add(source, target, self.result_notice, stretch=True)
        self.update_ready()

    def open_path(self, path: Path) -> bool:
        if path.is_dir():
            return False
        self.source.set_path(path)
        return True

    # --- installs --------------------------------------------------------------------------------

    def find(self) -> Job:
        """Look for ComfyUI installs (the user's folders first) off the GUI thread."""
        job = Job.call("Looking for ComfyUI", find_installs, self.settings.comfyui_paths)
        job.succeeded.connect(self._on_found)
        dialogs.report_errors(job, self)
        self.refresh.setEnabled(False)
        job.finished.connect(lambda: self.refresh.setEnabled(True))
        return job.start(self)

    def _on_found(self, installs: list[ComfyInstall]) -> None:
        self.installs = installs
        selected = self.settings.comfyui_selected
        self.install.blockSignals(True)
        self.install.clear()
        for install in installs:
            self.install.addItem(install.label, str(install.root))
        self.install.setCurrentIndex(max(0, self.install.findData(selected)))
        self.install.blockSignals(False)
        self.none_found.setVisible(not installs)
        self._update_target()
        self.installs_found.emit(installs)

    def current_install(self) -> ComfyInstall | None:
        index = self.install.currentIndex()
        return self.installs[index] if 0 <= index < len(self.installs) else None

    def kind(self) -> str:
        return self.kind_group.checkedButton().property("kind")

    def _update_target(self) -> None:
        install = self.current_install()
        if install is not self.node_pack.install:
            self.node_pack.show_install(install)
        self.folder.clear()
        self.folder.setToolTip("")
        if install is not None:
            self.settings.comfyui_selected = str(install.root)
            try:
                self.folder.setText(str(install.export_folder(self.kind())))
            except ComfyUIError as error:  # its extra_model_paths.yaml could not be read
                self.folder.setPlaceholderText(str(error))
                self.folder.setToolTip(str(error))
        self.update_ready()

    # --- file ------------------------------------------------------------------------------------

    def _on_source(self, path: Path | None) -> None:
        self.entry = None
        self.source_facts.show_facts([])
        self.result_notice.hide()  # the last export's outcome belongs to the file it had
        self.panel.clear()
        self.update_ready()
        if path is None:
            return
        self.name.setText(path.name)
        job = Job.call("Reading the file", describe_file, path)
        job.succeeded.connect(lambda entry: self._on_described(path, entry))
        dialogs.report_errors(job, self)
        job.start(self)

    def _on_described(self, path: Path, entry: LibraryEntry) -> None:
        if path != self.source.path():
            return
        self.entry = entry
        facts = [("Kind", entry.kind), ("Size", format_bytes(entry.size))]
        if entry.model:
            facts.insert(1, ("Model", entry.model))
        if entry.format:
            facts.insert(2, ("Format", entry.format))
        if entry.note:
            facts.append(("Note", entry.note))
        self.source_facts.show_facts(facts)
        kind = export_kind(path)
        next(b for b in self.kind_group.buttons() if b.property("kind") == kind).setChecked(True)
        self.update_ready()

    # --- export ----------------------------------------------------------------------------------

    def request(self) -> ExportRequest:
        return ExportRequest(
            source=self.source.path(),
            folder=Path(self.folder.text()),
            kind=self.kind(),
            name=self.name.text().strip() or None,
            link=self.link.isChecked(),
        )

    def update_ready(self) -> None:
        require(
            self.export_button,
            [("a file", self.entry is not None), ("a ComfyUI install", bool(self.folder.text()))],
            "Verify and put the file in ComfyUI.",
            self.panel.running,
        )

    def export(self) -> Job:
        self.result_notice.hide()
        return self.start(
            "Exporting", run_export, self.request(), self.panel, self.export_button, self._on_exported
        )

    def renamed(self, request: ExportRequest, output: Path) -> ExportRequest:
        return dataclasses.replace(request, name=output.name)

    def _on_exported(self, result: ExportResult) -> None:
        self.result = result
        text = result.summary[0].upper() + result.summary[1:] + "."
        if not result.already_there:
            text += " Refresh ComfyUI to see it."
        self.result_notice.set(text, "success")
        self.result_notice.show()
        self.reveal(self.result_notice)
