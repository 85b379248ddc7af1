"""The desktop app's Library page downloading a model, on the offscreen platform, through real engine
jobs (offline, from a folder; no mocked engine): the plan, the download, and the engine's errors."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QMessageBox

from engine.hub import plan_download, plan_summary
from engine.jobs import JobError
from tests.app_helpers import WAIT


def test_download_offline_from_a_folder(qtbot, window, demo):
    page = window.pages["library"]
    window.show_page("library")
    page.repo.setText("someone/flux2-klein-demo")
    page.into.set_path(demo.parent)
    page.offline.setChecked(True)
    page.check_download()
    qtbot.waitUntil(lambda: bool(page.plan_label.text()), timeout=WAIT)
    plan = plan_download(page.download_request())
    assert page.plan_label.text() == f"{plan_summary(plan)}\n{plan[0].label}."
    assert page.plan_label.text().startswith("1 file, ") and f"{demo.name} (" in page.plan_label.text()
    assert "; 0 bytes to download\n" in page.plan_label.text() and "already here" in page.plan_label.text()
    job = page.download()
    qtbot.waitSignal(job.finished, timeout=WAIT).wait()
    assert page.downloaded.isVisible() and page.download_model == demo
    page.to_convert.click()
    assert window.current_page().key == "convert" and window.pages["convert"].source.path() == demo
    qtbot.waitUntil(lambda: demo in {e.path for e in page.entries}, timeout=WAIT)


def shown_plan_problem(qtbot, page, repo: str, folder) -> str:
    """Plan an offline download of ``repo`` from ``folder`` on the Library page, which the engine refuses:
    the problem the page shows, checked to be the engine's own message."""
    page.repo.setText(repo)
    page.into.set_path(folder)
    page.offline.setChecked(True)
    with pytest.raises(JobError) as expected:
        plan_download(page.download_request())
    page.check_download()
    qtbot.waitUntil(lambda: page.plan_problem.isVisibleTo(page), timeout=WAIT)
    assert page.plan_problem.label.text() == str(expected.value)
    return page.plan_problem.label.text()


def test_download_errors_come_from_the_engine(qtbot, window, tmp_path):
    page = window.pages["library"]
    shown_plan_problem(qtbot, page, "someone/nothing-here", tmp_path / "empty")
    assert not page.plan_label.text() and window.findChild(QMessageBox) is None
    page.repo.setText("someone/another")
    assert not page.plan_problem.isVisibleTo(page)


def test_a_repository_without_a_model_says_what_it_has(qtbot, window, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    for name in ("README.md", "config.json"):
        (folder / name).write_text("{}")
    problem = shown_plan_problem(qtbot, window.pages["library"], "someone/no-model", folder)
    assert "someone/no-model" in problem and ".safetensors" in problem
