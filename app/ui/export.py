"""Export page."""

from __future__ import annotations

from app.settings import Settings
from app.ui.widgets import Notice, Page


class ExportPage(Page):
    key, title, icon_name = "export", "Export", "export"
    subtitle = "Put a converted or merged file into your ComfyUI models folder, verified."

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.add(Notice("Coming next."), stretch=True)
