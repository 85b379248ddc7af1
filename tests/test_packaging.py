"""A non-editable install ships what the app reads at run time."""

from __future__ import annotations

import tomllib
from pathlib import Path

from app.ui import theme

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_covers_every_app_asset():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    app = ROOT / "app"
    shipped = {path for pattern in package_data["app"] for path in app.glob(pattern)}
    assets = {path for path in theme.ASSETS.rglob("*") if path.is_file()}
    assert theme.ASSETS.is_relative_to(app) and (theme.ASSETS / "style.qss") in assets
    assert assets - shipped == set()
