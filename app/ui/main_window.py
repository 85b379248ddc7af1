"""The main window: a sidebar of pages, the page area, and a status bar with the GPU, the running jobs
and RAM."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import (
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QGuiApplication,
    QKeySequence,
    QShortcut,
)
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QSizePolicy,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app import system
from app.settings import Settings
from app.ui import dialogs, theme
from app.ui.benchmark import BenchmarkPage
from app.ui.convert import ConvertPage
from app.ui.export import ExportPage
from app.ui.jobpanel import JobPanel
from app.ui.jobs_indicator import JobsIndicator
from app.ui.library import LibraryPage, page_for_path
from app.ui.lora import LoraPage
from app.ui.page import Page
from app.ui.path_fields import dropped_paths
from app.ui.settings import SettingsPage
from app.ui.tables import refit_tables
from app.workers import Job
from engine import __version__

DEFAULT_SIZE = QSize(1200, 800)
MINIMUM_SIZE = QSize(900, 600)  # fits a 1280×720 screen, at 100 % or 1920×1080 at 150 %, with a taskbar


def first_size(available: QSize) -> QSize:
    """The window's size on its first start: the default, shrunk to the screen's free area (never
    below the minimum: the pages scroll)."""
    return DEFAULT_SIZE.boundedTo(available).expandedTo(MINIMUM_SIZE)


class MainWindow(QMainWindow):
    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.setWindowTitle("INT8 Studio")
        self.setAcceptDrops(True)
        self.setMinimumSize(MINIMUM_SIZE)
        self._closing = False

        self.pages: dict[str, Page] = {}
        for page in (
            LibraryPage(settings),
            ConvertPage(settings),
            BenchmarkPage(settings),
            LoraPage(settings),
            ExportPage(settings),
            SettingsPage(settings),
        ):
            self.pages[page.key] = page
            page.send.connect(self.open_path)
        settings_page, export = self.pages["settings"], self.pages["export"]
        settings_page.theme_changed.connect(self.apply_theme)
        settings_page.comfyui_changed.connect(export.find)
        self.pages["benchmark"].results_changed.connect(self.show_gpu)
        export.add_install.clicked.connect(settings_page.choose_comfyui)
        export.installs_found.connect(self.pages["library"].set_installs)
        export.installs_found.connect(settings_page.set_installs)
        QTimer.singleShot(0, export.find)  # the library lists the installs' folders once found

        self.stack = QStackedWidget()
        for page in self.pages.values():
            self.stack.addWidget(page)
        root = QWidget()
        layout = QHBoxLayout(root)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self._sidebar())
        layout.addWidget(self.stack, 1)
        self.setCentralWidget(root)
        self._status_bar()
        self._shortcuts()

        QGuiApplication.styleHints().colorSchemeChanged.connect(lambda _: self.apply_theme())
        self.apply_theme()
        self.show_page(settings.page if settings.page in self.pages else "convert")
        if settings.geometry is None or not self.restoreGeometry(settings.geometry):
            self.resize(first_size(self.screen().availableGeometry().size()))

    # --- layout ----------------------------------------------------------------------------------

    def _sidebar(self) -> QWidget:
        sidebar = QWidget()
        sidebar.setObjectName("sidebar")
        sidebar.setFixedWidth(212)
        layout = QVBoxLayout(sidebar)
        layout.setContentsMargins(0, 18, 0, 14)
        layout.setSpacing(4)

        brand = QHBoxLayout()
        brand.setContentsMargins(18, 0, 12, 14)
        brand.setSpacing(10)
        logo = QLabel()
        logo.setPixmap(theme.icon("logo", "#000000").pixmap(34, 34))
        names = QVBoxLayout()
        names.setSpacing(0)
        title, sub = QLabel("INT8 Studio"), QLabel(f"INT8 W8A8 · v{__version__}")
        title.setObjectName("brand")
        sub.setObjectName("brandSub")
        names.addWidget(title)
        names.addWidget(sub)
        brand.addWidget(logo)
        brand.addLayout(names, 1)
        layout.addLayout(brand)

        self.nav = QListWidget()
        self.nav.setObjectName("nav")
        self.nav.setAccessibleName("Pages")
        self.nav.setIconSize(QSize(20, 20))
        self.nav.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        for number, page in enumerate(self.pages.values(), start=1):
            item = QListWidgetItem(page.title)
            item.setData(Qt.ItemDataRole.UserRole, page.key)
            item.setToolTip(f"{page.subtitle}  (Ctrl+{number})")
            item.setSizeHint(QSize(0, 42))
            self.nav.addItem(item)
        self.nav.currentRowChanged.connect(self._on_nav)
        layout.addWidget(self.nav, 1)
        return sidebar

    def _status_bar(self) -> None:
        bar = self.statusBar()
        bar.setSizeGripEnabled(False)
        self.gpu_icon, self.gpu_label = QLabel(), QLabel()
        self.ram_icon, self.ram_label = QLabel(), QLabel()
        self.gpu_label.setAccessibleName("GPU")
        self.ram_label.setAccessibleName("System memory")
        theme.bind_icon(self.gpu_icon, "gpu", "muted", 14)
        theme.bind_icon(self.ram_icon, "memory", "muted", 14)
        self.gpu_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        bar.addWidget(self.gpu_icon)
        bar.addWidget(self.gpu_label, 1)  # what is left of the bar; cut short on a small window
        self.jobs = JobsIndicator()
        self.jobs.show_page.connect(self.show_page)
        for page in self.pages.values():
            for panel in page.findChildren(JobPanel):
                panel.started.connect(lambda job, key=page.key: self.jobs.track(job, key))
        for widget in (self.jobs, self.ram_icon, self.ram_label):
            bar.addPermanentWidget(widget)
        self.gpus: list[system.Gpu] = []
        QTimer.singleShot(0, self.refresh_hardware)  # after the window is up: torch loads slowly
        self._ram_timer = QTimer(self, interval=3000, timeout=self._refresh_ram)
        self._ram_timer.start()

    def _shortcuts(self) -> None:
        QShortcut(QKeySequence.StandardKey.Open, self, self.choose_file)
        QShortcut(QKeySequence("Ctrl+Q"), self, self.close)
        for number, key in enumerate(self.pages, start=1):
            QShortcut(QKeySequence(f"Ctrl+{number}"), self, lambda key=key: self.show_page(key))

    # --- behaviour -------------------------------------------------------------------------------

    def apply_theme(self) -> None:
        tokens = theme.apply_theme(QApplication.instance(), self.settings.theme)
        for row, page in enumerate(self.pages.values()):
            self.nav.item(row).setIcon(
                theme.icon(page.icon_name, tokens["muted"], tokens["accent"])
            )
        refit_tables(self)

    def refresh_hardware(self) -> None:
        self.gpus = system.gpus()
        self.show_gpu()
        self.pages["benchmark"].hardware_found(has_gpu=bool(self.gpus))
        self._refresh_ram()

    def show_gpu(self) -> None:
        """The status bar's GPU line, and the settings' list: the last benchmark's advice for this GPU,
        else the guess (the tooltip holds the whole advice and what it rests on: the line is cut short on
        a small window)."""
        self.pages["settings"].set_gpus(self.gpus)
        runs = self.settings.benchmark_results
        self.gpu_label.setText(system.gpu_summary(self.gpus, self.settings.gpu_index, runs))
        gpu = system.selected_gpu(self.gpus, self.settings.gpu_index)
        advice = gpu.advice(runs) if gpu else None
        self.gpu_label.setToolTip(
            "\n".join(advice.lines()) if advice else
            "INT8 W8A8 runs on INT8 tensor cores: NVIDIA Turing (RTX 20) and newer — Ampere, Ada, "
            "Hopper, Blackwell. Older GPUs and CPUs can still convert and run INT8 files; they just "
            "won't be faster than bf16. Run a benchmark to measure it on this GPU."
        )  # fmt: skip

    def _refresh_ram(self) -> None:
        self.ram_label.setText(system.ram_summary())

    def show_page(self, key: str) -> None:
        self.nav.setCurrentRow(list(self.pages).index(key))

    def _on_nav(self, row: int) -> None:
        page = list(self.pages.values())[row]
        self.stack.setCurrentWidget(page)
        self.settings.page = page.key

    def current_page(self) -> Page:
        return self.stack.currentWidget()

    def open_path(self, key: str | None, path: Path) -> None:
        """Hand ``path`` to page ``key``, or else the current page, or else the page for that file
        (:func:`page_for_path`), and show the page that took it."""
        path = Path(path)
        for candidate in (key, self.current_page().key, page_for_path(path)):
            if candidate and self.pages[candidate].open_path(path):
                self.show_page(candidate)
                return

    def choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model or LoRA", self.settings.last_folder, "Safetensors (*.safetensors)"
        )
        if path:
            self.open_path(None, Path(path))

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if dropped_paths(event):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        """Files dropped anywhere outside a path field: each to the page that takes it (a model and
        its LoRAs dropped together on the LoRA page fill the model and the stack)."""
        for path in dropped_paths(event):
            self.open_path(None, path)
        event.acceptProposedAction()

    def closeEvent(self, event: QCloseEvent) -> None:
        writing = [job for job in Job.active() if not job.background]
        if writing and not self._closing:
            event.ignore()
            names = ", ".join(sorted({job.title for job in writing}))
            dialogs.ask(
                self,
                "A job is still running",
                f"{names} is still running. Cancel it and quit? "
                "Anything it was writing will be removed.",
                "Cancel and quit",
                "Keep working",
                self._cancel_and_close,
            )
            return
        if writing:  # already cancelling: close once the last job has stopped
            event.ignore()
            return
        for job in Job.active():  # header reads and scans: nothing to lose
            job.cancel()
        self.settings.geometry = self.saveGeometry()
        self.settings.sync()
        event.accept()

    def _cancel_and_close(self) -> None:
        self._closing = True
        for job in Job.active():
            job.finished.connect(self._close_when_idle)
            job.cancel()

    def _close_when_idle(self) -> None:
        if not any(not job.background for job in Job.active()):
            self.close()
