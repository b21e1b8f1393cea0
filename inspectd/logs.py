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


class _LineLogger(structlog.PrintLogger):
    """A PrintLogger whose failed write loses that line, not the thread that logged it: with stdout's reader gone (a
    supervisor restarted, `| tee` killed) or its file on a full disk, a control request's log line ended the control
    thread, a reload's the reload, a stop's the stop, with frames already accepted left unjudged."""

    lost = 0  # lines no write took, over every logger of the process

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):  # EPIPE, ENOSPC, EIO; ValueError: stdout closed
            _LineLogger.lost += 1

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg


class _LineHandler(logging.StreamHandler):
    """The standard-library records' handler, losing a line it cannot write as _LineLogger does (logging's own
    handleError would print a traceback per record to stderr, which a lost stdout often shares)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], (OSError, ValueError)):
            _LineLogger.lost += 1
        else:  # a record that cannot be formatted (its arguments): said as logging says it
            super().handleError(record)


def lines_lost() -> int:
    """Log lines the process could not write (stdout's reader gone, a full disk)."""
    return _LineLogger.lost


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
        logger_factory=lambda *_args: _LineLogger(sys.stdout),
        cache_logger_on_first_use=False,
    )
    if not stdlib:
        return
    handler = _LineHandler(sys.stdout)
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
