import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


FAKE_HOME_VARIABLE = "INT8_STUDIO_TESTS_HOME"


def _fake_home() -> Path:
    """Tests never read the real home or the real settings: a ComfyUI install, app settings or a cache
    there would change what they find. HOME and every per-user folder variable point into one temporary
    folder for the whole session (set at import, before Qt, huggingface_hub or the engine read them)."""
    if os.environ.get(FAKE_HOME_VARIABLE):  # this module imported a second time (as tests.conftest)
        return Path(os.environ[FAKE_HOME_VARIABLE])
    home = Path(tempfile.mkdtemp(prefix="int8-studio-tests-home-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ[FAKE_HOME_VARIABLE] = str(home)
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))  # a cache: keep it
    for name, sub in {
        "HOME": "", "USERPROFILE": "", "XDG_CONFIG_HOME": ".config", "XDG_CACHE_HOME": ".cache",
        "XDG_DATA_HOME": ".local/share", "XDG_STATE_HOME": ".local/state", "APPDATA": "AppData/Roaming",
        "LOCALAPPDATA": "AppData/Local", "HF_HOME": ".cache/huggingface",
    }.items():  # fmt: skip
        os.environ[name] = str(home / sub)
    for name in ("INT8_STUDIO_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        os.environ.pop(name, None)
    return home


FAKE_HOME = _fake_home()
if not torch.cuda.is_available():
    # No GPU: Triton kernels run in its interpreter on CPU tensors. Must be set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_real_home():
    """Each test runs with the session's fake home (a test that moves HOME gets it back)."""
    assert Path.home() == FAKE_HOME, f"a test left HOME at {Path.home()}"
    yield


# --- the app's tests: the demo model and a window (Qt and the app imported only when a test asks) ---


@pytest.fixture(scope="session")
def demo_master(tmp_path_factory) -> Path:
    from engine.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_int8_master(demo_master, tmp_path_factory) -> Path:
    from engine.convert import ConvertRequest, run_convert

    output = tmp_path_factory.mktemp("demo-int8") / "demo-int8.safetensors"
    return run_convert(ConvertRequest(demo_master, output, scheme="rowwise")).output


def _linked(master: Path, folder: Path) -> Path:
    """``master`` alone in a fresh ``folder`` (a hard link: the engine never writes to its input)."""
    folder.mkdir()
    os.link(master, folder / master.name)
    return folder / master.name


@pytest.fixture
def demo(demo_master, tmp_path) -> Path:
    return _linked(demo_master, tmp_path / "models")


@pytest.fixture
def demo_int8(demo_int8_master, tmp_path) -> Path:
    return _linked(demo_int8_master, tmp_path / "int8")


@pytest.fixture
def settings(tmp_path):
    """The app's settings in a file of the test's own, with a cache folder of its own."""
    from app.settings import Settings

    settings = Settings(tmp_path / "settings.ini")
    settings.cache_folder = str(tmp_path / "cache")
    return settings


@pytest.fixture
def window(qtbot, settings):
    """The main window, shown; jobs still running at the end are cancelled and waited for."""
    from app.ui.main_window import MainWindow
    from app.workers import Job
    from tests.app_helpers import WAIT

    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    yield window
    for job in Job.active():
        job.cancel()
    qtbot.waitUntil(lambda: not Job.active(), timeout=WAIT)
