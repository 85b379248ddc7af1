"""Where INT8 Studio keeps its own files (the demo model, tuned kernel configs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    """INT8 Studio's cache folder: ``$INT8_STUDIO_CACHE``, else the platform's user cache folder."""
    if os.environ.get("INT8_STUDIO_CACHE"):
        return Path(os.environ["INT8_STUDIO_CACHE"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "int8-studio"
