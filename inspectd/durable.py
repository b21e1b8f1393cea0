"""Files that a kill or a power cut leaves whole: the one way the daemon and the bridges replace a small state file
and make a directory's entries durable. The implementation is engines.durable's (the bundle store shares it); this
is the name the daemon and the clients import it by."""

from __future__ import annotations

from engines.durable import fsync_dir, replace_file

__all__ = ["fsync_dir", "replace_file"]
