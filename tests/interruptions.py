"""Interrupting CLI jobs at random points, many times, cheaply: ``python -m tests.interruptions``.

It imports the CLI (and torch) once, then forks one child per run, so a run costs the job's own time
instead of an interpreter start. It reads a JSON plan on stdin and writes JSON results on stdout:

    {"jobs": {name: {"argv": [...], "outputs": [paths], "folders": [paths]}},
     "pairs": [[job, signal number], ...], "interruptions": N, "seed": S, "scratch": folder}

Each job is first run once uninterrupted, to time it. Then, for each pair, the job is started in a
fresh child and sent the signal at a random point of that time (of the shortest run so far, where a
job finished before its signal), until it was stopped N times; every
run reports the child's status, its stderr, the temporary files left in ``folders`` and whether each
output is complete (it is removed afterwards, so that every run starts from the same state).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _child(argv: list[str], log: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # until main() takes over: as early in a process start
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        from engine.cli import main

        code = main(argv)
    except BaseException:  # noqa: BLE001 (a bug: show it, as Python would)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(raw: int) -> int:
    """The exit status, or minus the signal that killed the child."""
    return os.waitstatus_to_exitcode(raw)


def _complete(path: str) -> bool | None:
    """None if ``path`` is absent, else whether it reads back as a whole safetensors file."""
    from engine.checkpoint import CheckpointError, CheckpointReader

    if not os.path.exists(path):
        return None
    try:
        with CheckpointReader(path):
            return True
    except CheckpointError:
        return False


def _one(job: dict, signo: int | None, delay: float, log: str) -> dict:
    started = time.monotonic()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a signal before the child is ready waits
    pid = os.fork()
    if pid == 0:
        _child(job["argv"], log)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if signo is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass
    _, raw = os.waitpid(pid, 0)
    seconds = time.monotonic() - started
    with open(log, encoding="utf-8", errors="replace") as f:
        stderr = f.read()
    left = sorted(
        os.path.join(folder, name)
        for folder in job["folders"]
        for name in os.listdir(folder)
        if ".partial-" in name or name.endswith(".incomplete")
    )
    outputs = {path: _complete(path) for path in job["outputs"]}
    for path in job["outputs"]:
        if os.path.exists(path):
            os.unlink(path)
    return {"status": _status(raw), "stderr": stderr, "left": left, "outputs": outputs, "seconds": seconds}


def main() -> None:
    # everything a job imports, once, before the forks (the CLI itself imports each job only when it runs)
    import engine.cli.parser  # noqa: F401
    import engine.convert  # noqa: F401
    import engine.demo  # noqa: F401
    import engine.export  # noqa: F401
    import engine.info  # noqa: F401
    import engine.library  # noqa: F401
    import engine.lora  # noqa: F401

    plan = json.load(sys.stdin)
    log = os.path.join(plan["scratch"], "child.log")
    baseline = {name: _one(job, None, 0.0, log) for name, job in plan["jobs"].items()}
    rng = random.Random(plan["seed"])
    runs = []
    seconds = {name: run["seconds"] for name, run in baseline.items()}
    for name, signo in plan["pairs"]:  # until the job was stopped so many times (or too many tries)
        stopped = 0
        for _ in range(6 * plan["interruptions"]):
            delay = rng.uniform(0.0, 0.8) * seconds[name]
            run = _one(plan["jobs"][name], signo, delay, log)
            runs.append({"job": name, "signal": signo, "delay": delay, **run})
            stopped += run["status"] == 128 + signo
            if run["status"] == 0:  # done before the signal: the timed run was slow (a loaded machine)
                seconds[name] = min(seconds[name], run["seconds"])
            if stopped == plan["interruptions"]:
                break
    json.dump({"baseline": baseline, "runs": runs}, sys.stdout)


if __name__ == "__main__":
    main()
