"""The Export page's INT8 Studio nodes row: status line and one button, through the engine's real jobs,
with a fake ComfyUI Python (tests/test_node_pack.py) so that pip never runs."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

from app.settings import Settings
from app.ui.main_window import MainWindow
from app.workers import Job
from engine.node_pack_status import PACK_FOLDER, PackSource
from tests.test_node_pack import fake_comfyui, fake_python, fake_state

WAIT = 30_000  # ms; generous for 2-core CI machines


@pytest.fixture
def page(qtbot, tmp_path):
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    python = fake_python(comfy / "venv" / "bin" / "python", platform="win32", missing=("triton",))
    settings = Settings(tmp_path / "settings.ini")
    settings.cache_folder = str(tmp_path / "cache")
    settings.comfyui_paths = [str(comfy)]
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    window.show_page("export")
    page = window.pages["export"]
    qtbot.waitUntil(lambda: page.node_pack.status is not None, timeout=WAIT)
    yield page, comfy, python
    for job in Job.active():
        job.cancel()
    qtbot.waitUntil(lambda: not Job.active(), timeout=WAIT)


def test_install_then_remove_from_the_export_page(qtbot, page):
    page, comfy, python = page
    row = page.node_pack
    assert row.label.text() == "INT8 Studio nodes: not installed" and row.button.text() == "Install nodes"
    assert row.button.isEnabled()

    qtbot.mouseClick(row.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: row.notice.isVisible() and row.status is not None, timeout=WAIT)
    version = PackSource.here().version
    assert row.label.text() == f"INT8 Studio nodes: installed v{version}" and row.button.text() == "Remove nodes"
    command = f"{python} -m pip install 'triton-windows>=3.5,<3.6'"
    log = row.log.toPlainText().splitlines()
    assert log[0] == f"$ {command}" and "Successfully installed triton-windows>=3.5,<3.6" in log  # every line
    assert row.log.isVisible() and fake_state(python)["pip"] == [["-m", "pip", "install", "triton-windows>=3.5,<3.6"]]
    assert row.notice.label.text() == (
        f"Installed INT8 Studio nodes v{version} in {comfy / 'custom_nodes' / PACK_FOLDER}; restart ComfyUI to "
        f"load them. Installed into ComfyUI's Python with: {command}"
    )
    assert (comfy / "custom_nodes" / PACK_FOLDER / "vendor" / "engine").is_dir()

    row.button.click()
    qtbot.waitUntil(lambda: page.window().findChild(QMessageBox, "question") is not None, timeout=WAIT)
    box = page.window().findChild(QMessageBox, "question")
    next(b for b in box.buttons() if b.text() == "Remove").click()
    qtbot.waitUntil(lambda: row.label.text() == "INT8 Studio nodes: not installed", timeout=WAIT)
    assert not (comfy / "custom_nodes" / PACK_FOLDER).exists() and row.button.text() == "Install nodes"
    assert row.notice.label.text().startswith(f"Removed INT8 Studio nodes v{version} from ")
