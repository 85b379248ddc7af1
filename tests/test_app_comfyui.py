"""The desktop app with a ComfyUI install (a fake checkout), on the offscreen platform, through real
engine jobs on the built-in demo model: the Library lists ComfyUI's folders beside its own, Export
copies models and LoRAs into them, Settings refuses a folder that is not ComfyUI; and no test sees an
install in the real home."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton

from app.settings import Settings
from app.ui.main_window import MainWindow
from app.workers import Job
from engine.comfyui import open_install
from engine.demo import DEMO_CONFIG
from engine.export import run_export
from engine.jobs import JobError
from engine.library import describe_file
from tests.app_helpers import WAIT, message_box
from tests.tiny_loras import write_lora


def fake_comfyui(root: Path) -> Path:
    """A ComfyUI git checkout as ComfyUI's own code lays it out (main.py, folder_paths.py, comfy/)."""
    for folder in ("comfy", "models/diffusion_models", "models/loras", "models/unet"):
        (root / folder).mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "folder_paths.py").write_text("")
    return root


def test_tests_never_see_the_real_home(qtbot):
    """A ComfyUI install, settings or a cache in the real home must not change what a test finds
    (tests/conftest.py points HOME and every per-user folder into a temporary folder)."""
    from engine.comfyui import Places, find_installs
    from engine.paths import cache_dir
    fake_home = Path(os.environ["INT8_STUDIO_TESTS_HOME"])
    places = Places.here()
    assert places.home == fake_home and places.roaming.is_relative_to(fake_home)
    assert cache_dir().is_relative_to(fake_home)
    assert Path(Settings().store.fileName()).is_relative_to(fake_home)
    assert find_installs() == []  # nothing in the fake home: a real install is never listed


@pytest.fixture
def comfy_window(qtbot, settings, tmp_path):
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    settings.comfyui_paths = [str(comfy)]
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: bool(window.pages["export"].installs), timeout=WAIT)
    yield window, comfy
    for job in Job.active():
        job.cancel()
    qtbot.waitUntil(lambda: not Job.active(), timeout=WAIT)


def test_library_lists_comfyui_and_own_folders(qtbot, comfy_window, demo, demo_int8, tmp_path):
    window, comfy = comfy_window
    page = window.pages["library"]
    os.link(demo_int8, comfy / "models/diffusion_models" / demo_int8.name)
    lora = write_lora(
        comfy / "models/loras/style.safetensors", "flux2", "kohya", config=DEMO_CONFIG
    )
    page.open_path(demo.parent)  # a dropped folder joins the library
    expected = {
        p: describe_file(p)
        for p in (demo, comfy / "models/diffusion_models" / demo_int8.name, lora.path)
    }
    qtbot.waitUntil(lambda: {e.path for e in page.entries} == set(expected), timeout=WAIT)
    rows = {
        page.table.item(r, 0).text(): [page.table.item(r, c).text() for c in range(1, 4)]
        for r in range(page.table.rowCount())
    }
    for path, entry in expected.items():
        assert rows[path.name] == [entry.kind, entry.model or "—", entry.format or "—"]
    assert str(demo.parent) in window.settings.library_folders

    page.search.setText("lora")
    visible = [r for r in range(page.table.rowCount()) if not page.table.isRowHidden(r)]
    assert [page.table.item(r, 0).text() for r in visible] == ["style.safetensors"]
    page.search.clear()

    row = next(r for r in range(page.table.rowCount()) if page.table.item(r, 0).text() == demo.name)
    page.table.selectRow(row)
    assert page.actions["convert"].isEnabled() and page.actions["benchmark"].isEnabled()
    page.actions["convert"].click()
    assert window.current_page().key == "convert"
    assert window.pages["convert"].source.path() == demo


def test_export_into_a_comfyui_folder(qtbot, comfy_window, demo_int8):
    window, comfy = comfy_window
    page = window.pages["export"]
    window.open_path("export", demo_int8)
    qtbot.waitUntil(lambda: page.entry is not None, timeout=WAIT)
    assert page.folder.text() == str(comfy / "models/diffusion_models")
    assert page.name.text() == demo_int8.name
    name = f"exported-{random.randint(0, 9999)}.safetensors"
    page.name.setText(name)
    page.link.setChecked(False)  # a copy: a hard link to the source would make it "already there"
    qtbot.mouseClick(page.export_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_notice.isVisible(), timeout=WAIT)
    target = comfy / "models/diffusion_models" / name
    assert page.result.path == target and not page.result.linked
    assert target.read_bytes() == demo_int8.read_bytes()
    assert page.result_notice.label.text() == "E" + page.result.summary[1:] + ". Refresh ComfyUI to see it."
    assert page.result_notice.label.text().startswith(f"Exported {target} (copy, ")  # the CLI's words

    with pytest.raises(JobError):
        run_export(page.request())
    page.export()  # the name is taken: keep both
    qtbot.waitUntil(lambda: page.panel.problem.isVisible(), timeout=WAIT)
    assert page.panel.problem.label.text() == f"{name} already exists in {target.parent}."
    keep = next(b for b in page.panel.problem.findChildren(QPushButton) if b.text() == "Keep both")
    qtbot.mouseClick(keep, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: page.result_notice.isVisible(), timeout=WAIT)
    second = target.with_name(target.stem + "-2.safetensors")
    assert page.result.path == second and second.read_bytes() == target.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([name, second.name])


def test_a_lora_is_exported_to_the_lora_folder(qtbot, comfy_window, tmp_path):
    window, comfy = comfy_window
    page = window.pages["export"]
    lora = write_lora(tmp_path / "style.safetensors", "flux2", "comfyui", config=DEMO_CONFIG).path
    window.open_path("export", lora)
    qtbot.waitUntil(lambda: page.kind() == "loras", timeout=WAIT)
    assert page.folder.text() == str(comfy / "models/loras")
    page.export()
    qtbot.waitUntil(lambda: page.result_notice.isVisible(), timeout=WAIT)
    assert (comfy / "models/loras/style.safetensors").read_bytes() == lora.read_bytes()


def test_a_folder_that_is_not_comfyui_is_refused(qtbot, window, tmp_path):
    folder = tmp_path / "not-comfy"
    folder.mkdir()
    with pytest.raises(JobError) as expected:
        open_install(folder)
    window.pages["settings"].add_comfyui(folder)
    box = message_box(qtbot, window, "jobError")
    assert box.text() == str(expected.value)
    assert window.settings.comfyui_paths == []
    assert window.pages["settings"].comfy_list.count() == 0
