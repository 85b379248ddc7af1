"""`engine.paths.cache_dir`: the user's choice first, then the platform's cache folder."""

from __future__ import annotations

import os
import sys

import pytest

from engine.paths import cache_dir


def test_int8_studio_cache_wins(monkeypatch, tmp_path):
    chosen = tmp_path / os.urandom(4).hex()
    monkeypatch.setenv("INT8_STUDIO_CACHE", str(chosen))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == chosen


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG folders are for Linux and BSD")
def test_xdg_cache_home_then_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("INT8_STUDIO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "int8-studio"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "int8-studio"
