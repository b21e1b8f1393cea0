"""The log format of every long-running inspectd process (the daemon, the PLC bridge, the web view): structlog JSON
(or console) lines on stdout, so journald keeps them and one jq filter reads them all."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
# syslog priorities, which journald reads from a "<N>" prefix on each stdout line (SyslogLevelPrefix=, on by default),
# so `journalctl -p warning` shows exactly the warnings and errors.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


def stdout_is_journal() -> bool:
    """systemd connected stdout to the journal: JOURNAL_STREAM names that stream's device:inode."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _priority_prefix(_logger: Any, method_name: str, line: Any) -> Any:
    return f"<{PRIORITIES.get(method_name, 6)}>{line}"


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """structlog JSON (or console) lines on stdout; one event per state change, never per frame. Under systemd each
    line starts with its syslog priority for journald."""
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
            *([_priority_prefix] if stdout_is_journal() else []),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
