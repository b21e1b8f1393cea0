"""Running a test's child process as another user than the test's own: `as_nobody`. Root reads and writes
everywhere, so a refusal for want of permission needs another user; the folders that user must reach are opened by
conftest's `open_tmp_path` fixture."""

from __future__ import annotations

import os

NOBODY = 65534


def as_nobody(command: list[str], group: int = NOBODY) -> list[str]:
    """`command` as user nobody (in `group`) when this is root, else `command` as it is: as any other user the
    permissions already apply to it. setpriv, because subprocess's own user= cannot exec an interpreter installed
    under root's 0700 home."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={group}", "--clear-groups", *command]
