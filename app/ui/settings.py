"""Settings page: appearance, ComfyUI folders, the cache folder and which GPU to use."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
)

from app import system
from app.settings import Settings
from app.ui import dialogs
from app.ui.cards import Card
from app.ui.forms import muted
from app.ui.page import Page
from app.ui.path_fields import PathField, add_remove_row, path_list
from app.workers import Job
from engine.comfyui import ComfyInstall, open_install

THEME_LABELS = {"system": "Follow the system", "light": "Light", "dark": "Dark"}


class SettingsPage(Page):
    key, title, icon_name = "settings", "Settings", "settings"
    subtitle = "Where your ComfyUI lives, where downloads go, and which GPU does the work."
    theme_changed = Signal()
    comfyui_changed = Signal()

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)

        appearance = Card("Appearance", icon_name="sparkle")
        self.theme_combo = QComboBox()
        self.theme_combo.setAccessibleName("Colour theme")
        self.theme_combo.setToolTip(
            "Light or dark; 'Follow the system' switches with your desktop."
        )
        for key, label in THEME_LABELS.items():
            self.theme_combo.addItem(label, key)
        self.theme_combo.setCurrentIndex(list(THEME_LABELS).index(settings.theme))
        self.theme_combo.currentIndexChanged.connect(self._on_theme)
        self.theme_combo.setMaximumWidth(360)
        appearance.body.addWidget(self.theme_combo)

        comfy = Card(
            "ComfyUI folders",
            "Your ComfyUI installs: the folder with main.py, the portable build's ComfyUI folder, or "
            "ComfyUI Desktop's base path. Export and Library look inside their models folders "
            "(and their extra_model_paths.yaml).",
            "comfyui",
        )
        self.comfy_list = path_list("ComfyUI folders", settings.comfyui_paths, 96)
        buttons = add_remove_row(
            "Add folder…",
            "Add a ComfyUI folder that was not found automatically.",
            "Forget the selected folder (nothing on disk is touched).",
            self.choose_comfyui,
            self._remove_comfyui,
        )
        self.found = muted("Looking for ComfyUI installs…")
        comfy.body.addWidget(self.found)
        comfy.body.addWidget(self.comfy_list)
        comfy.body.addLayout(buttons)

        cache = Card(
            "Cache folder",
            "Where Hugging Face downloads and the built-in demo model are kept.",
            "folder",
        )
        self.cache_field = PathField("folder", str(settings.cache_dir()))
        self.cache_field.setAccessibleName("Cache folder")
        self.cache_field.set_path(settings.cache_folder or None, emit=False)
        self.cache_field.changed.connect(self._on_cache)
        cache.body.addWidget(self.cache_field)

        device = Card(
            "GPU",
            "The GPU that conversion quantizes on, and the one the status bar describes.",
            "gpu",
        )
        self.gpu_combo = QComboBox()
        self.gpu_combo.setAccessibleName("GPU")
        self.gpu_combo.currentIndexChanged.connect(self._on_gpu)
        self.gpu_combo.setMaximumWidth(360)
        self.gpu_note = muted("")
        device.body.addWidget(self.gpu_combo)
        device.body.addWidget(self.gpu_note)

        self.add(appearance, comfy, cache, device, stretch=True)

    def set_installs(self, installs: list[ComfyInstall]) -> None:
        """Show every install found, those added here and those found on their own."""
        labels = "".join(f"<br>• {install.label}" for install in installs)
        self.found.setText(f"Found:{labels}" if installs else "No ComfyUI install found yet.")

    def set_gpus(self, gpus: list[system.Gpu]) -> None:
        self.gpu_combo.blockSignals(True)
        self.gpu_combo.clear()
        for gpu in gpus:
            self.gpu_combo.addItem(f"{gpu.index}: {gpu.name} ({gpu.sm})", gpu.index)
        if not gpus:
            self.gpu_combo.addItem("No CUDA GPU found", -1)
        index = self.gpu_combo.findData(self.settings.gpu_index)
        self.gpu_combo.setCurrentIndex(max(0, index))
        self.gpu_combo.setEnabled(len(gpus) > 1)
        self.gpu_combo.blockSignals(False)
        self.gpu_note.setText(system.gpu_summary(gpus, self.settings.gpu_index, self.settings.benchmark_results))

    def _on_theme(self) -> None:
        self.settings.theme = self.theme_combo.currentData()
        self.theme_changed.emit()

    def _on_cache(self, path: Path | None) -> None:
        self.settings.cache_folder = str(path) if path else ""

    def _on_gpu(self) -> None:
        if self.gpu_combo.currentData() is not None and self.gpu_combo.currentData() >= 0:
            self.settings.gpu_index = self.gpu_combo.currentData()

    def choose_comfyui(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a ComfyUI folder")
        if folder:
            self.add_comfyui(Path(folder))

    def add_comfyui(self, folder: Path) -> Job:
        """Remember ``folder`` once it proves to be a ComfyUI install (else say why, in a dialog)."""
        job = Job.call("Adding the ComfyUI folder", open_install, folder)
        job.succeeded.connect(lambda install: self._remember(install.root))
        dialogs.report_errors(job, self)
        return job.start(self)

    def _remember(self, root: Path) -> None:
        if str(root) not in self.settings.comfyui_paths:
            self.settings.comfyui_paths = [*self.settings.comfyui_paths, str(root)]
            self.comfy_list.addItem(str(root))
        self.comfyui_changed.emit()

    def _remove_comfyui(self) -> None:
        for item in self.comfy_list.selectedItems():
            self.settings.comfyui_paths = [
                p for p in self.settings.comfyui_paths if p != item.text()
            ]
            self.comfy_list.takeItem(self.comfy_list.row(item))
        self.comfyui_changed.emit()
