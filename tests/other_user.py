"""Running a test's child process as another user than the test's own: `as_nobody`. Root reads and writes
everywhere, so a refusal for want of permission needs another user; the folders that user must reach are opened by
conftest's `open_tmp_path` fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]


def as_nobody(command: list[str], group: int = NOBODY) -> list[str]:
    """`command` as user nobody (in `group`) when this is root, else `command` as it is: as any other user the
    permissions already apply to it. setpriv, because subprocess's own user= cannot exec an interpreter installed
    under root's 0700 home."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={group}", "--clear-groups", *command]


def inspectd_without(private: Path, *argv: str) -> subprocess.CompletedProcess:
    """`inspectd ARGV` run as nobody (see as_nobody) while file `private` is one it may not read (0600, root's; mode 0
    for a test not run as root), its mode put back to 0644 after."""
    private.chmod(0o600 if os.geteuid() == 0 else 0o000)
    try:
        return subprocess.run(
            as_nobody([sys.executable, "-m", "inspectd", *argv]), cwd=REPO, capture_output=True, text=True, timeout=120
        )
    finally:
        private.chmod(0o644)
