"""The one progress line of every long command (train, eval, calibrate, bench): what, step/total, ETA, on stderr.

Imports nothing of the project, so every package may use it (tests/test_layering.py puts it below all of them).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """One updating status line on stderr: what, step/total, loss, ETA. Off a terminal it prints plain lines, at
    most one a second, so logs stay readable."""

    def __init__(self, stream=None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.what, self.total, self.started, self.last = "", 0, 0.0, -1.0
        self.line = ""

    def start(self, total: int, what: str = "train") -> None:
        self.finish()
        self.what, self.total, self.started, self.last = what, int(total), time.monotonic(), -1.0

    def update(self, step: int, loss: float | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = step >= self.total
        if not final and self.last >= 0 and now - self.last < (0.1 if self.tty else 1.0):
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / step * (self.total - step) if step else float("nan")
        line = f"{self.what} {step}/{self.total}"
        if loss is not None:
            line += f" loss {loss:.4f}"
        line += f" elapsed {elapsed:.0f}s ETA {eta:.0f}s" if step else ""
        self.line = line
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A log line on the same stream, kept apart from the progress line (which a terminal shows again below
        it). Printed even when the progress line is off."""
        if self.enabled and self.tty and self.last >= 0:
            self.stream.write(f"\r{message}\x1b[K\n{self.line}\x1b[K")
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def around(self, write: Callable[[str], None], line: str) -> None:
        """`write(line)` to another stream (a table on stdout) while the progress line shows: on a terminal the line
        is erased first and drawn again below, so the two do not share a row."""
        drawn = self.enabled and self.tty and self.last >= 0
        if drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        write(line)
        if drawn:
            self.stream.write(self.line)
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty and self.last >= 0:
            self.stream.write("\n")
            self.stream.flush()
        self.last = -1.0
