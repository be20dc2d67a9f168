"""SIGINT and SIGTERM during a benchmark: stop, keep what was measured, never pass for a complete run.

A per-row `except Exception` keeps one contender's failure from losing the others' numbers; it must
never swallow a request to stop. Three layers make sure of that:
  - the handlers raise `Stopped`, a BaseException (like KeyboardInterrupt), which no `except Exception`
    catches;
  - library code can still turn it into an ordinary exception (torch.compile wraps whatever its
    compiler raised in BackendCompilerFailed): every per-row handler calls `check()` first, which raises
    `Stopped` again once a signal has arrived;
  - the CLI asks `received()` before it writes a complete result: a run that was asked to stop writes
    `<name>-partial` and exits 128 + the signal (130 for SIGINT, 143 for SIGTERM), whatever was caught
    on the way.
A second signal while the first is being handled (the partial result being written) is recorded and
does not interrupt the writing; before that it raises again.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_handling = [False]


class Stopped(BaseException):
    """A stop request (SIGINT or SIGTERM) raised where the run was; not an Exception on purpose."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _handler(signum, frame):
    _received.append(signum)
    if not _handling[0]:
        raise Stopped(signum)


def install() -> dict | None:
    """Route SIGINT and SIGTERM to `Stopped` (main thread only); returns the previous handlers for `restore`."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _received.clear()
    _handling[0] = False
    return {s: signal.signal(s, _handler) for s in SIGNALS}


def restore(previous: dict | None) -> None:
    if previous:
        for s, h in previous.items():
            signal.signal(s, h)


def received() -> int | None:
    """The first signal received since `install`, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise `Stopped` if a signal arrived: call it in every handler that catches Exception per row."""
    if _received:
        raise Stopped(_received[0])


def handling() -> None:
    """The stop is being handled: later signals are recorded, not raised (the partial result is written)."""
    _handling[0] = True


def ignore_until_exit() -> None:
    """The process exits after a handled stop: ignore SIGINT and SIGTERM for the rest of it. A second Ctrl-C during
    the interpreter's exit (a torch process takes a while) would otherwise kill the process by SIGINT instead of
    letting it exit 130 (Python's finalization puts the default action back for a Python-level handler; an
    ignored signal it leaves ignored). Main thread only, like every handler."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def describe(signum: int) -> str:
    return "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
