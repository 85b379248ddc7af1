"""Library page: every model and LoRA in the ComfyUI folders and the user's own, from headers only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QPoint, Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QMenu,
    QPushButton,
    QTableWidgetItem,
)

from app.settings import Settings
from app.ui import dialogs, theme
from app.ui.cards import Card, Notice
from app.ui.file_actions import copy_path, show_in_folder
from app.ui.forms import form, muted, primary_button
from app.ui.jobpanel import JobPanel
from app.ui.page import Page
from app.ui.path_fields import PathField, add_remove_row, path_list
from app.ui.tables import fit_rows, table
from app.workers import Job
from engine.checkpoint import format_bytes
from engine.comfyui import ComfyInstall
from engine.hub import (
    EXAMPLE_REPO,
    DownloadRequest,
    DownloadResult,
    RemoteFile,
    plan_download,
    plan_summary,
    run_download,
)
from engine.library import (
    MODEL_KINDS,
    LibraryEntry,
    LibraryRequest,
    LibraryResult,
    comfyui_folders,
    describe_file,
    run_library_scan,
)

COLUMNS = ["Name", "Kind", "Model", "Format", "Size", "Modified", "Folder"]
NAME, FOLDER = 0, len(COLUMNS) - 1
NAME_WIDTH, FOLDER_WIDTH = 280, 120  # px: the least each keeps (elided in the middle); names take the rest


class SortItem(QTableWidgetItem):
    """A cell that sorts by a value of its own (bytes, seconds) rather than by its text."""

    def __init__(self, text: str, key: object) -> None:
        super().__init__(text)
        self.key = key

    def __lt__(self, other: QTableWidgetItem) -> bool:
        return self.key < getattr(other, "key", other.text())


class LibraryPage(Page):
    key, title, icon_name = "library", "Library", "library"
    subtitle = "Every model and LoRA in your ComfyUI folders and your own, with what each one is."

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.installs: list[ComfyInstall] = []
        self.entries: list[LibraryEntry] = []

        where = Card(
            "Where to look",
            "Your ComfyUI model folders are included automatically. Add your own folders here, or "
            "drop files and folders anywhere on this page.",
            "folder",
        )
        self.comfy_folders = muted("Looking for ComfyUI…")
        self.folders = path_list("Your model folders", settings.library_folders, 72)
        buttons = add_remove_row(
            "Add folder…",
            "Add a folder of models; its subfolders are listed too.",
            "Stop listing the selected folder (nothing on disk is touched).",
            self._choose_folder,
            self._remove_folder,
        )
        where.body.addWidget(self.comfy_folders)
        where.body.addWidget(self.folders)
        where.body.addLayout(buttons)

        models = Card("Models and LoRAs", icon_name="library")
        self.search = QLineEdit()
        self.search.setPlaceholderText("Filter by name, model or format")
        self.search.setAccessibleName("Filter the library")
        self.search.setClearButtonEnabled(True)
        self.search.setMinimumWidth(280)
        self.search.textChanged.connect(self._filter)
        self.rescan = QPushButton("Rescan")
        theme.bind_icon(self.rescan, "refresh")
        self.rescan.setToolTip("Read the folders again (only new or changed files are opened).")
        self.rescan.clicked.connect(self.refresh)
        models.header.addWidget(self.search)
        models.header.addWidget(self.rescan)
        self.panel = JobPanel()
        self.empty = Notice(
            "Nothing here yet. Add a folder, drop a .safetensors file on this page, or try the demo "
            "model on the Convert page."
        )
        self.table = table(COLUMNS, "Models and LoRAs", stretch=None)
        header = self.table.horizontalHeader()
        for column in (NAME, FOLDER):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Interactive)
        header.sectionResized.connect(lambda column, *_: NAME < column < FOLDER and self._fit_names())
        self.table.viewport().installEventFilter(self)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._context_menu)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.itemSelectionChanged.connect(self._update_actions)
        self.table.itemDoubleClicked.connect(lambda _: self._open_default())
        actions = QHBoxLayout()
        self.actions = {
            "convert": QPushButton("Convert"),
            "export": QPushButton("Export to ComfyUI"),
            "lora": QPushButton("Use on LoRA page"),
            "benchmark": QPushButton("Benchmark"),
        }
        for page, button in self.actions.items():
            theme.bind_icon(button, page)
            button.clicked.connect(lambda _=False, page=page: self._send(page))
            actions.addWidget(button)
        actions.addStretch(1)
        self.file_actions = {
            "Show in folder": (QPushButton("Show in folder"), show_in_folder),
            "Copy path": (QPushButton("Copy path"), copy_path),
        }
        for button, act in self.file_actions.values():
            button.clicked.connect(lambda _=False, act=act: self._on_selected(act))
            actions.addWidget(button)
        theme.bind_icon(self.file_actions["Show in folder"][0], "folder")
        models.body.addWidget(self.panel)
        models.body.addWidget(self.empty)
        models.body.addWidget(self.table)
        models.body.addLayout(actions)

        self.add(models, where, self._download_card(), stretch=True)
        self._show([])

    def _download_card(self) -> Card:
        card = Card(
            "Download from Hugging Face",
            "A source model to convert, or a ready INT8 one. Sizes are shown before anything is "
            "fetched; an interrupted download resumes. Gated repos use the token that "
            "'hf auth login' saved.",
            "download",
        )
        fields = form()
        self.repo = QLineEdit()
        self.repo.setPlaceholderText(EXAMPLE_REPO)
        self.repo.setAccessibleName("Hugging Face repository")
        self.repo.textChanged.connect(self._forget_plan)
        self.files = QLineEdit()
        self.files.setPlaceholderText(
            "Empty: the model. Or file names and patterns, e.g. *.safetensors"
        )
        self.files.setAccessibleName("Files to download")
        self.files.setToolTip(
            "Leave empty to get the model itself: the repo's one .safetensors file, or its "
            "diffusers transformer/ folder. Separate several names or patterns with spaces."
        )
        self.into = PathField("folder", "The Hugging Face cache (shared with other apps)")
        self.into.setAccessibleName("Download folder")
        self.into.setToolTip(
            "Empty: the Hugging Face cache, where other tools find it too. A folder: the files go "
            "straight there, for example your ComfyUI models/diffusion_models."
        )
        self.offline = QCheckBox("Offline: only use files already downloaded")
        fields.addRow("Repository", self.repo)
        fields.addRow("Files", self.files)
        fields.addRow("Into", self.into)
        fields.addRow("", self.offline)
        card.body.addLayout(fields)
        self.plan_label = muted("")
        actions = QHBoxLayout()
        actions.addWidget(self.plan_label, 1)
        self.check_button = QPushButton("Check sizes")
        self.check_button.setToolTip("List the files and their sizes; nothing is downloaded.")
        self.check_button.clicked.connect(self.check_download)
        self.download_button = primary_button("Download", "download")
        self.download_button.clicked.connect(self.download)
        actions.addWidget(self.check_button)
        actions.addWidget(self.download_button)
        card.body.addLayout(actions)
        self.plan_problem = Notice("", "warning")  # why the repository gives nothing to download
        self.plan_problem.hide()
        card.body.addWidget(self.plan_problem)
        self.download_panel = JobPanel()
        card.body.addWidget(self.download_panel)
        self.downloaded = Notice("", "success")
        self.to_convert = QPushButton("Convert it")
        theme.bind_icon(self.to_convert, "convert", "accent")
        self.downloaded.actions.addWidget(self.to_convert)
        self.downloaded.hide()
        self.download_model: Path | None = None
        self.to_convert.clicked.connect(lambda: self.send.emit("convert", self.download_model))
        card.body.addWidget(self.downloaded)
        return card

    # --- sources ---------------------------------------------------------------------------------

    def set_installs(self, installs: list[ComfyInstall]) -> None:
        self.installs = installs
        folders = comfyui_folders(installs)
        self.comfy_folders.setText(
            f"ComfyUI: {len(folders)} model folders from {len(installs)} install(s)."
            if installs
            else "No ComfyUI install found: add its folder in Settings to list its models here."
        )
        self.comfy_folders.setToolTip("\n".join(map(str, folders)))
        self.refresh()

    def scan_folders(self) -> list[Path]:
        return [*comfyui_folders(self.installs), *map(Path, self.settings.library_folders)]

    def open_path(self, path: Path) -> bool:
        """A dropped folder joins the library's folders; a dropped file is listed on its own."""
        if path.is_dir():
            self.add_folder(path)
        else:
            self.settings.add_recent(path)
            self.refresh()
        return True

    def add_folder(self, folder: Path) -> None:
        if str(folder) not in self.settings.library_folders:
            self.settings.library_folders = [*self.settings.library_folders, str(folder)]
            self.folders.addItem(str(folder))
        self.refresh()

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Add a folder of models", self.settings.last_folder
        )
        if folder:
            self.add_folder(Path(folder))

    def _remove_folder(self) -> None:
        for item in self.folders.selectedItems():
            self.settings.library_folders = [
                f for f in self.settings.library_folders if f != item.text()
            ]
            self.folders.takeItem(self.folders.row(item))
        self.refresh()

    # --- scanning --------------------------------------------------------------------------------

    def refresh(self) -> Job | None:
        if self.panel.running:
            self.panel.job.cancel()  # the folders changed: the running scan is out of date
        files = tuple(Path(p) for p in self.settings.recent_files)  # also those outside the folders
        folders = self.scan_folders()
        job = Job("Scanning", run_library_scan, LibraryRequest(tuple(folders), files))
        job.background = True
        job.succeeded.connect(lambda result: self._show(result.entries))
        return self.panel.run(job, lambda result: _found(result, len(folders)))

    def _show(self, entries: list[LibraryEntry]) -> None:
        self.entries = entries
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(entries))
        for row, entry in enumerate(entries):
            name = SortItem(entry.path.name, entry.path.name.lower())
            name.setData(Qt.ItemDataRole.UserRole, row)
            cells = [
                name,
                QTableWidgetItem(entry.kind),
                QTableWidgetItem(entry.model or "—"),
                QTableWidgetItem(entry.format or "—"),
                SortItem(format_bytes(entry.size), entry.size),
                SortItem(
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified)), entry.modified
                ),
                QTableWidgetItem("/".join(entry.path.parent.parts[-2:])),
            ]
            tip = "\n".join(filter(None, [str(entry.path), entry.note]))
            for column, cell in enumerate(cells):
                cell.setToolTip(tip)
                self.table.setItem(row, column, cell)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(
            self.table.horizontalHeader().sortIndicatorSection(),
            self.table.horizontalHeader().sortIndicatorOrder(),
        )
        fit_rows(self.table, least=4, most=12)
        self.empty.setVisible(not entries)
        self.table.setVisible(bool(entries))
        self._filter(self.search.text())
        self._update_actions()
        self._fit_names()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.table.viewport() and event.type() == QEvent.Type.Resize:
            self._fit_names()
        return False

    def _fit_names(self) -> None:
        """Names take what the columns between (fitted to their contents) and the folder leave; when
        that is short, the folder gives way first, down to ``FOLDER_WIDTH``, then the names, down to
        ``NAME_WIDTH`` (a Stretch column would shrink to nothing)."""
        header = self.table.horizontalHeader()
        spare = self.table.viewport().width() - sum(header.sectionSize(c) for c in range(NAME + 1, FOLDER))
        wanted = max(self.table.sizeHintForColumn(FOLDER), header.sectionSizeHint(FOLDER))
        folder = max(min(wanted, spare - NAME_WIDTH), FOLDER_WIDTH)
        header.resizeSection(FOLDER, folder)
        header.resizeSection(NAME, max(NAME_WIDTH, spare - folder))

    def _filter(self, text: str) -> None:
        words = text.lower().split()
        for row in range(self.table.rowCount()):
            line = " ".join(self.table.item(row, c).text().lower() for c in range(len(COLUMNS)))
            self.table.setRowHidden(row, not all(w in line for w in words))

    # --- downloads -------------------------------------------------------------------------------

    def download_request(self) -> DownloadRequest:
        return DownloadRequest(
            repo_id=self.repo.text().strip(),
            files=tuple(self.files.text().split()),
            folder=self.into.path(),
            offline=self.offline.isChecked(),
        )

    def check_download(self) -> Job:
        """List what would be downloaded, or say here (not also in a dialog) why nothing would be."""
        self.plan_label.clear()
        self.plan_problem.hide()
        job = Job.call("Checking the download", plan_download, self.download_request())
        job.succeeded.connect(self._show_plan)
        job.failed.connect(lambda error: self._show_plan_problem(str(error)))
        job.crashed.connect(
            lambda summary, details: dialogs.show_bug(self.window(), f"{job.title} stopped", summary, details)
        )
        return job.start(self)

    def _show_plan_problem(self, message: str) -> None:
        self.plan_problem.set(message, "warning")
        self.plan_problem.show()

    def _show_plan(self, plan: list[RemoteFile]) -> None:
        names = ", ".join(f.label for f in plan[:4])
        more = f" and {len(plan) - 4} more" if len(plan) > 4 else ""
        self.plan_label.setText(f"{plan_summary(plan)}\n{names}{more}.")

    def _forget_plan(self) -> None:
        """A plan, its problem and the last download's outcome belong to the repository they were for."""
        self.plan_label.clear()
        self.plan_problem.hide()
        self.downloaded.hide()
        self.download_panel.clear()

    def download(self) -> Job:
        self.downloaded.hide()
        job = Job("Downloading", run_download, self.download_request())
        job.succeeded.connect(self._on_downloaded)
        return self.download_panel.run(job)

    def _on_downloaded(self, result: DownloadResult) -> None:
        self.download_model = result.model
        fetched = format_bytes(result.downloaded) if result.downloaded else "nothing new"
        where = self.download_model or result.paths[0].parent
        self.downloaded.set(
            f"Downloaded {len(result.paths)} files ({fetched}) to {where}.", "success"
        )
        self.to_convert.setVisible(self.download_model is not None)
        self.downloaded.show()
        if self.download_model is not None and self.download_model.is_file():  # a folder: scanned as such
            self.settings.add_recent(self.download_model)
        self.refresh()

    # --- actions ---------------------------------------------------------------------------------

    def selected(self) -> LibraryEntry | None:
        rows = {index.row() for index in self.table.selectedIndexes()}
        if len(rows) != 1:
            return None
        return self.entries[self.table.item(rows.pop(), 0).data(Qt.ItemDataRole.UserRole)]

    def _update_actions(self) -> None:
        entry = self.selected()
        model = entry is not None and entry.kind in MODEL_KINDS
        int8 = model and entry.format.startswith("int8")
        lora = entry is not None and entry.kind == "LoRA"
        self.actions["convert"].setEnabled(model and not int8)
        self.actions["export"].setEnabled(model or lora)
        self.actions["lora"].setEnabled(model or lora)
        self.actions["benchmark"].setEnabled(model)
        for button, _ in self.file_actions.values():
            button.setEnabled(entry is not None)

    def _context_menu(self, point: QPoint) -> None:
        """Right-click on a file: what the buttons under the table do, for that file."""
        if self.table.itemAt(point) is None:
            return
        self.table.selectRow(self.table.itemAt(point).row())
        menu = QMenu(self.table)
        for label, (_, act) in self.file_actions.items():
            menu.addAction(label, lambda act=act: self._on_selected(act))
        menu.addSeparator()
        for page, button in self.actions.items():
            menu.addAction(button.text(), lambda page=page: self._send(page)).setEnabled(button.isEnabled())
        menu.popup(self.table.viewport().mapToGlobal(point))

    def _on_selected(self, act: Callable[[Path], None]) -> None:
        entry = self.selected()
        if entry is not None:
            act(entry.path)

    def _open_default(self) -> None:
        """Double-click: convert a source model, export an INT8 one, stack a LoRA."""
        entry = self.selected()
        if entry is not None and entry.kind in (*MODEL_KINDS, "LoRA"):
            self._send(page_for(entry))

    def _send(self, page: str) -> None:
        entry = self.selected()
        if entry is not None:
            self.send.emit(page, entry.path)


def _found(result: LibraryResult, folders: int) -> str:
    text = f"{len(result.entries)} files in {folders} folders."
    return text + (f" Not found: {', '.join(map(str, result.missing))}." if result.missing else "")


def page_for(entry: LibraryEntry) -> str:
    """The page a file opens on by default: a LoRA on LoRA, an INT8 model on Export, anything else
    (a float model, a diffusers folder, a file that cannot be read: the page says why) on Convert."""
    if entry.kind == "LoRA":
        return "lora"
    return "export" if entry.kind in MODEL_KINDS and entry.format.startswith("int8") else "convert"


def page_for_path(path: Path) -> str:
    """:func:`page_for` of a file on disk, from its header (a folder: Convert)."""
    try:
        return "convert" if path.is_dir() else page_for(describe_file(path))
    except OSError:
        return "convert"
