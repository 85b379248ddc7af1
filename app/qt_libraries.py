"""Whether Qt's X11 platform plugin can load, checked before Qt tries: Qt aborts the whole process when it
cannot, with a message about "xcb" that names no library. This reads what the plugin links against
(``ldd``) and names the system libraries that are missing, with the command that installs them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

DEBIAN_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libOpenGL.so.0": "libopengl0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
}
"""Shared library → the Debian/Ubuntu package that holds it (what Qt 6's xcb plugin links against)."""

_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$", re.MULTILINE)


def missing_libraries(ldd_output: str) -> list[str]:
    """The libraries ``ldd`` could not find, in its order, once each."""
    return list(dict.fromkeys(_NOT_FOUND.findall(ldd_output)))


def advice(missing: list[str]) -> str:
    """What to tell the user: the missing libraries, and the command that installs the known ones."""
    packages = [DEBIAN_PACKAGES[name] for name in missing if name in DEBIAN_PACKAGES]
    unknown = [name for name in missing if name not in DEBIAN_PACKAGES]
    lines = [f"The window cannot open: Qt needs system libraries that are missing: {', '.join(missing)}."]
    if packages:
        lines.append(f"On Debian or Ubuntu: sudo apt install {' '.join(packages)}")
    if unknown:
        lines.append(f"Install the packages that provide {', '.join(unknown)} with your system's package manager.")
    lines.append("The command line works without them: int8-studio --help")
    return "\n".join(lines)


def xcb_plugin() -> Path | None:
    """PySide6's X11 platform plugin, if this is a PySide6 that has one."""
    try:
        import PySide6
    except ImportError:
        return None
    plugin = Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    return plugin if plugin.is_file() else None


def will_use_xcb(environ=None, platform: str | None = None) -> bool:
    """Whether Qt will pick its X11 plugin: Linux, an X display, and no other platform asked for."""
    environ = os.environ if environ is None else environ
    wanted = environ.get("QT_QPA_PLATFORM", "")
    return (platform or sys.platform).startswith("linux") and bool(environ.get("DISPLAY")) and wanted in ("", "xcb")


def check_qt_platform() -> str | None:
    """The advice for a window that cannot open here, or None where it can (or where it cannot be told)."""
    plugin = xcb_plugin() if will_use_xcb() else None
    ldd = shutil.which("ldd")
    if plugin is None or ldd is None:
        return None
    try:
        done = subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    missing = missing_libraries(done.stdout)
    return advice(missing) if missing else None
