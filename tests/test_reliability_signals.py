"""Every way the CLI can be asked to stop (Ctrl-C, ``kill``, a closed terminal) removes what it was
writing, leaves its inputs as they were, prints one line and exits with 128 + the signal's number."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability import comfyui, digests
from tests.test_hub import REPO, FakeHub, hub, safetensors_bytes  # noqa: F401 (hub: the fixture)
from tests.tiny_checkpoints import write_single_file
from tests.tiny_loras import write_lora

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}
STOPPED = {signal.SIGINT: "int8-studio: cancelled\n", signal.SIGTERM: "int8-studio: stopped by SIGTERM\n",
           signal.SIGHUP: "int8-studio: stopped by SIGHUP\n"}  # fmt: skip
INTERRUPTIONS = 30  # per job and signal
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="signals and fork are POSIX")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_every_stop_signal_at_random_points_leaves_nothing(tmp_path):
    """convert, lora merge and export, each interrupted 30 times by each of SIGINT, SIGTERM and SIGHUP
    at random points of the job (forked from one process: a run costs the job's time only)."""
    inputs, out, comfy = tmp_path / "in", tmp_path / "out", comfyui(tmp_path / "ComfyUI")
    inputs.mkdir()
    out.mkdir()
    model = write_single_file(inputs / "model.safetensors", "flux2").path
    int8 = write_single_file(inputs / "int8.safetensors", "flux2", fmt="int8_rowwise").path
    lora = write_lora(inputs / "lora.safetensors", "flux2", "kohya").path
    models = comfy / "models" / "diffusion_models"
    jobs = {
        "convert": {"argv": ["convert", str(model), "-o", str(out / "c.safetensors")],
                    "outputs": [str(out / "c.safetensors")], "folders": [str(out)]},
        "merge": {"argv": ["lora", "merge", str(int8), f"{lora}:0.8", "-o", str(out / "m.safetensors")],
                  "outputs": [str(out / "m.safetensors")], "folders": [str(out)]},
        "export": {"argv": ["export", str(int8), "--comfyui", str(comfy), "--copy"],
                   "outputs": [str(models / "int8.safetensors")], "folders": [str(models)]},
    }  # fmt: skip
    pairs = [[job, signo] for job in jobs for signo in SIGNALS.values()]
    before = digests(inputs)
    plan = json.dumps(
        {"jobs": jobs, "pairs": pairs, "interruptions": INTERRUPTIONS, "seed": 23, "scratch": str(tmp_path)}
    )
    done = subprocess.run(
        [sys.executable, "-m", "tests.interruptions"], input=plan, capture_output=True, text=True,
        cwd=ROOT, env=env(), timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for name, base in found["baseline"].items():
        assert (base["status"], base["left"]) == (0, []), (name, base["stderr"])
        assert all(base["outputs"].values()), name
    stopped = {(job, signo): 0 for job in jobs for signo in SIGNALS.values()}
    for run in found["runs"]:
        signo, where = run["signal"], (run["job"], signal.Signals(run["signal"]).name, round(run["delay"], 3))
        assert run["left"] == [], where
        assert "Traceback" not in run["stderr"], (where, run["stderr"])
        if run["status"] == 128 + signo:  # stopped: a line saying so, and no output
            # (the log holds stdout too: a stop just after the job printed what it did follows that)
            assert run["stderr"].endswith(STOPPED[signo]) and "int8-studio: error" not in run["stderr"], where
            assert all(v in (None, True) for v in run["outputs"].values()), where
            stopped[run["job"], signo] += 1
        elif run["status"] == 0:  # the signal came once the job was done: its output is whole
            assert all(run["outputs"].values()), where
        else:  # killed before main() took the signal over, or after it returned
            assert run["status"] == -signo, (where, run["status"], run["stderr"])
            assert all(v in (None, True) for v in run["outputs"].values()), where
    assert digests(inputs) == before
    assert os.listdir(out) == []
    assert set(stopped.values()) == {INTERRUPTIONS}, stopped  # each job, by each signal


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_stop_during_start_up_prints_no_traceback(tmp_path, name):
    """The signal arrives while Python is still importing torch: one line, the conventional status."""
    model = write_single_file(tmp_path / "model.safetensors", "flux2").path
    child = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "convert", str(model)], cwd=ROOT, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    catches_sigterm = 1 << (signal.SIGTERM - 1)
    while not int(Path(f"/proc/{child.pid}/status").read_text().split("SigCgt:")[1].split()[0], 16) & catches_sigterm:
        time.sleep(0.001)  # until main() has put its handlers in place: its first step, before torch
    child.send_signal(SIGNALS[name])
    out, err = child.communicate(timeout=60)
    assert (child.returncode, out, err) == (128 + SIGNALS[name], "", STOPPED[SIGNALS[name]])
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_stop_during_a_download_removes_the_partial_file(tmp_path, hub, name):  # noqa: F811
    data = safetensors_bytes(1450)  # 12.6 MB at 2 MB/s
    hub.add(REPO, {"big.safetensors": data})
    hub.rate = 2_000_000
    folder = tmp_path / "models"
    child = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "download", REPO, "--to", str(folder)], cwd=ROOT,
        env={**env(), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(tmp_path / "hub")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not hub.ranges and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    child.send_signal(SIGNALS[name])
    _, err = child.communicate(timeout=60)
    assert (child.returncode, err) == (128 + SIGNALS[name], STOPPED[SIGNALS[name]])
    left = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in left if p.endswith((".incomplete", ".safetensors")) or ".partial-" in p], left


def test_a_stop_python_swallowed_is_raised_at_the_next_check(capfd):
    """A signal's exception can land where Python swallows it (here a weakref callback, as in importlib's
    module locks): nothing is printed, and the job's next cancel check raises it again."""
    import weakref

    from engine import cli, jobs

    handlers = {signo: signal.getsignal(signo) for signo in cli.STOP_SIGNALS}
    hook = sys.unraisablehook
    try:
        cli.install_stop_handlers()

        class Held:
            pass

        held = Held()
        ref = weakref.ref(held, lambda _: cli._on_stop(signal.SIGTERM, None))
        del held  # the callback raises Stopped; Python reports it to sys.unraisablehook and goes on
        assert ref() is None and capfd.readouterr().err == ""
        with pytest.raises(jobs.Stopped) as stop:
            jobs.CancelToken().check()
        assert stop.value.signo == signal.SIGTERM
    finally:
        sys.unraisablehook = hook
        jobs.STOP_REQUESTS.clear()
        cli._stopping.clear()
        for signo, handler in handlers.items():
            signal.signal(signo, handler)
