"""Convert page."""

from __future__ import annotations

from app.settings import Settings
from app.ui.widgets import Notice, Page


class ConvertPage(Page):
    key, title, icon_name = "convert", "Convert", "convert"
    subtitle = "From a bf16 or fp8 checkpoint to an INT8 file ComfyUI loads: one click."

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.add(Notice("Coming next."), stretch=True)
