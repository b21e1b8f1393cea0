"""The log format of every long-running inspectd process (the daemon, the PLC bridge, the web view): structlog JSON
(or console) lines on stdout, so journald keeps them and one jq filter reads them all."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog
from structlog.typing import Processor

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


def configure_logging(level: str = "info", fmt: str = "json", stdlib: tuple[str, ...] = ()) -> None:
    """structlog JSON (or console) lines on stdout; one event per state change, never per frame. Under systemd each
    line starts with its syslog priority for journald. `stdlib` names the standard-library loggers (a library's own,
    e.g. aiohttp's) to render the same way, one line per record with any traceback inside it: by default Python
    writes them to stderr as bare text, a traceback over many lines, which no JSON reader of the log can parse."""
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    first: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    last: list[Processor] = [
        structlog.processors.format_exc_info,
        renderer,
        *([_priority_prefix] if stdout_is_journal() else []),
    ]
    structlog.configure(
        processors=[*first, *last],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    if not stdlib:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*first, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
        )
    )
    for name in stdlib:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False  # a root handler someone else set up must not print it a second time
        logger.setLevel(getattr(logging, level.upper()))
