"""The child processes of the tools: the daemon that `inspectd demo` and `inspectd bench daemon` start and stop."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def killed_on_a_stop(proc: subprocess.Popen) -> Iterator[list[int]]:
    """SIGTERM and SIGINT kill `proc` (SIGKILL) for as long as this lasts, and then do here what they would have done
    (`inspectd`'s stop, KeyboardInterrupt). Yields the signals taken so far: a wait that reads as it waits can see
    that its child was killed and end then.

    For a tool's clean-up around its daemon's drain: the daemon is told to stop, so a stop asked for then (the
    operator's second, or a first one during the tool's own end of run) is one not to wait for. Ignored, as
    `inspectd`'s first stop leaves SIGTERM, it kept the operator waiting out the drain; raised at once, it would end
    the tool with its daemon still draining, in a folder being removed or on the sockets and state lock the next run
    binds. SIGINT left ignored (a background job of a shell) stays ignored. Only the main thread can claim a signal:
    elsewhere the wait is as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    caught: list[int] = []

    def kill(signum, _frame):
        caught.append(signum)
        proc.kill()

    claimed = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) != signal.SIG_IGN else [])
    previous: list[tuple[signal.Signals, Any]] = []
    try:
        try:
            for signum in claimed:
                # Recorded before the claim: a stop that the old handler takes right after the claim (between two
                # claims) finds it in the list to undo. One it takes right before finds the signal not claimed.
                previous.append((signum, signal.getsignal(signum)))
                signal.signal(signum, kill)
        except BaseException:
            # A stop taken by the old handler between two claims: the same stop as one that comes a moment later.
            proc.kill()
            raise
        yield caught
    finally:
        _give_back(previous, kill)
        for signum in claimed:
            if signum in caught:
                signal.raise_signal(signum)


def _give_back(previous: list[tuple[signal.Signals, Any]], ours: Any) -> None:
    """Put back each signal's old handler where `ours` still holds it, each in the finally of the one before: a stop
    that a handler just put back raises (a SIGTERM between the two) leaves no claim behind."""
    if not previous:
        return
    (signum, handler), rest = previous[0], previous[1:]
    try:
        if signal.getsignal(signum) is ours:
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    finally:
        _give_back(rest, ours)
