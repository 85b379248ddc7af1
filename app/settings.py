"""What the app remembers between runs, stored with QSettings.

Values are kept as JSON text so lists and dicts come back as they went in on every platform's
QSettings backend (the ini backend otherwise turns a one-item list into a string).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings

from engine.paths import cache_dir

RECENT_LIMIT = 10


class Setting:
    """A typed attribute of :class:`Settings`, stored under ``key`` with a default."""

    def __init__(self, key: str, default: Any) -> None:
        self.key, self.default = key, default

    def __get__(self, settings: Settings, owner: type) -> Any:
        raw = settings.store.value(self.key)
        if raw is None:
            return json.loads(json.dumps(self.default))  # a fresh copy of mutable defaults
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return json.loads(json.dumps(self.default))

    def __set__(self, settings: Settings, value: Any) -> None:
        settings.store.setValue(self.key, json.dumps(value))


class Settings:
    theme = Setting("appearance/theme", "system")  # "system" | "light" | "dark"
    page = Setting("window/page", "convert")
    recent_files = Setting("files/recent", [])
    last_folder = Setting("files/last_folder", "")
    library_folders = Setting("library/folders", [])
    comfyui_paths = Setting("comfyui/paths", [])
    comfyui_selected = Setting("comfyui/selected", "")
    cache_folder = Setting("cache/folder", "")
    gpu_index = Setting("device/gpu", 0)
    benchmark_results = Setting("benchmark/results", [])

    def __init__(self, path: Path | None = None) -> None:
        """The user's settings, or an ini file at ``path`` (tests, portable use)."""
        if path is None:
            self.store = QSettings("INT8 Studio", "INT8 Studio")
        else:
            self.store = QSettings(str(path), QSettings.Format.IniFormat)

    def add_recent(self, path: Path) -> None:
        text = str(path)
        self.recent_files = [text, *[p for p in self.recent_files if p != text]][:RECENT_LIMIT]
        self.last_folder = str(path.parent)

    def cache_dir(self) -> Path:
        """Where downloads and the demo model go: the chosen folder, else the engine's cache folder."""
        return Path(self.cache_folder) if self.cache_folder else cache_dir()

    @property
    def geometry(self) -> QByteArray | None:
        value = self.store.value("window/geometry")
        return value if isinstance(value, QByteArray) else None

    @geometry.setter
    def geometry(self, value: QByteArray) -> None:
        self.store.setValue("window/geometry", value)

    def sync(self) -> None:
        self.store.sync()
