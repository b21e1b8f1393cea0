"""`inspectd` as a child process that Ctrl-C can reach (not a test module itself)."""

from __future__ import annotations

import sys

# SIGINT back at its default action, then `python -m inspectd ARGS`: a test run from a background job, or by a pytest
# worker, inherits SIGINT ignored, and Python then never raises KeyboardInterrupt in the child.
_RESET = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'inspectd', *sys.argv[1:]])"
)


def inspectd_argv(*args: str) -> list[str]:
    """The argv that runs `inspectd ARGS` with SIGINT at its default action."""
    return [sys.executable, "-c", _RESET, *args]
