"""Library page."""

from __future__ import annotations

from app.settings import Settings
from app.ui.widgets import Notice, Page


class LibraryPage(Page):
    key, title, icon_name = "library", "Library", "library"
    subtitle = "Every model and LoRA in your ComfyUI folders and your own, with what it is."

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.add(Notice("Coming next."), stretch=True)
