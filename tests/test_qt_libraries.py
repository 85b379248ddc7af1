"""Naming the system libraries Qt's X11 plugin lacks, before Qt aborts the process without naming them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from app import qt_libraries
from app.qt_libraries import advice, missing_libraries, will_use_xcb

LDD = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibxcb-cursor.so.0 => not found
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f12)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-cursor.so.0 => not found
\tlibfrob.so.2 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f10)
"""


def test_missing_libraries_are_read_from_ldd_once_each():
    assert missing_libraries(LDD) == ["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libfrob.so.2"]
    assert missing_libraries("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n") == []


def test_advice_names_the_libraries_and_the_packages_that_hold_them():
    text = advice(missing_libraries(LDD))
    assert text.splitlines() == [
        "The window cannot open: Qt needs system libraries that are missing: libxcb-cursor.so.0, "
        "libxcb-icccm.so.4, libfrob.so.2.",
        "On Debian or Ubuntu: sudo apt install libxcb-cursor0 libxcb-icccm4",
        "Install the packages that provide libfrob.so.2 with your system's package manager.",
        "The command line works without them: int8-studio --help",
    ]


@pytest.mark.parametrize(
    ("environ", "platform", "expected"),
    [
        ({"DISPLAY": ":0"}, "linux", True),
        ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb"}, "linux", True),
        ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, "linux", False),
        ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", False),
        ({"DISPLAY": ":0"}, "win32", False),
    ],
)
def test_only_the_x11_plugin_is_checked(environ, platform, expected):
    assert will_use_xcb(environ, platform) is expected


@pytest.mark.skipif(shutil.which("ldd") is None or qt_libraries.xcb_plugin() is None, reason="needs ldd and PySide6's xcb plugin")
def test_this_machine_is_told_exactly_what_ldd_finds_missing(monkeypatch):
    """On the real plugin: advice exactly when ldd reports a library not found, naming each one."""
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.setattr(qt_libraries.sys, "platform", "linux")
    report = subprocess.run(["ldd", str(qt_libraries.xcb_plugin())], capture_output=True, text=True, check=False)
    missing = [line.split()[0] for line in report.stdout.splitlines() if line.rstrip().endswith("not found")]
    problem = qt_libraries.check_qt_platform()
    if missing:
        assert problem is not None and all(name in problem for name in missing)
    else:
        assert problem is None
