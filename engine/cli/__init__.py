"""`int8-studio`: the command-line face of the engine. With no arguments it opens the desktop app.

Exit status: 0 success, 2 bad input or user error (one line on stderr), 1 internal error, 128 + the
signal's number when asked to stop (130 Ctrl-C / SIGINT, 143 SIGTERM, 129 SIGHUP: whatever was being
written is removed first), 141 when the reader of the output went away (``| head``; quietly).

This module imports nothing heavy: :func:`main` puts its stop handlers in place before torch is
imported, so a stop request during start-up ends as quietly as one during a job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from engine.jobs import STOP_REQUESTS, Stopped  # light: no torch before the handlers are in place

DESCRIPTION = __doc__.splitlines()[0]
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
"""The signals that ask the process to stop: Ctrl-C, ``kill``, a closed terminal."""
BROKEN_PIPE_STATUS = 128 + 13  # as a Unix tool killed by SIGPIPE


_stopping: list[int] = []  # the first stop signal received (0: main() is returning)


def _on_stop(signo: int, _frame: object) -> None:
    if _stopping:  # already unwinding: let the clean-up finish
        return
    _stopping.append(signo)
    STOP_REQUESTS.append(signo)
    raise Stopped(signo)


def _unraisable(hook):
    """``sys.unraisablehook`` that stays silent about a :class:`~engine.jobs.Stopped` Python swallowed
    (raised in a weakref callback or a ``__del__``): the job's next cancel check raises it again."""

    def quiet(unraisable) -> None:
        if not isinstance(unraisable.exc_value, Stopped):
            hook(unraisable)

    return quiet


def install_stop_handlers() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`~engine.jobs.Stopped` (once: later ones wait for the
    clean-up)."""
    _stopping.clear()
    STOP_REQUESTS.clear()
    sys.unraisablehook = _unraisable(sys.__unraisablehook__)
    for signo in STOP_SIGNALS:
        signal.signal(signo, _on_stop)


@contextlib.contextmanager
def _held(signals) -> Iterator[None]:
    """Hold ``signals`` back (POSIX) while the handlers and the output streams are set up: a stop that
    landed inside ``reconfigure`` could leave stderr unable to say why the process ended."""
    if not signals or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    in_main_thread = threading.current_thread() is threading.main_thread()  # (tests may run us elsewhere)
    previous = {signo: signal.getsignal(signo) for signo in STOP_SIGNALS} if in_main_thread else {}
    try:
        with _held(STOP_SIGNALS if in_main_thread else ()):  # a stop now is taken once both are done
            if in_main_thread:
                install_stop_handlers()
            for stream in (sys.stdout, sys.stderr):  # a name that is not UTF-8 is shown, not a traceback
                if hasattr(stream, "reconfigure"):
                    stream.reconfigure(errors="backslashreplace")
        from engine.cli.parser import run

        return run(argv)
    except KeyboardInterrupt as stop:
        signo = getattr(stop, "signo", signal.SIGINT)  # a plain KeyboardInterrupt: Ctrl-C
        from engine.jobs import remove_temporary_files

        remove_temporary_files()
        what = "cancelled" if signo == signal.SIGINT else f"stopped by {signal.Signals(signo).name}"
        _say(f"int8-studio: {what}")
        return 128 + signo
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE_STATUS
    finally:
        _stopping.append(0)  # done: a signal from here on has nothing left to stop
        for signo, handler in previous.items():
            if handler is not None:
                signal.signal(signo, handler)


def _say(line: str) -> None:
    """``line`` on stderr, straight to the file descriptor if Python's stream cannot take it."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        try:
            os.write(2, f"{line}\n".encode(errors="backslashreplace"))
        except OSError:
            pass  # no stderr left to tell


def _quiet_stdout() -> None:
    """Point stdout at the null device: the reader is gone, and Python's final flush must not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
