"""Log lines as journald reads them: a `<N>` syslog priority prefix exactly when systemd connected stdout to the
journal (JOURNAL_STREAM names stdout's device:inode), so `journalctl -p warning` shows the warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import structlog
from inspectd.logs import configure_logging
configure_logging("debug", "json")
log = structlog.get_logger("t")
log.debug("d"); log.info("i"); log.warning("w", camera="cam0"); log.error("e")
"""


def run_logging(tmp_path: Path, journal: str | None) -> list[str]:
    out = tmp_path / "stdout"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    with open(out, "wb") as f:
        if journal == "this":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal is not None:
            env["JOURNAL_STREAM"] = journal
        subprocess.run([sys.executable, "-c", SCRIPT], stdout=f, env=env, check=True, timeout=60)
    return out.read_text().splitlines()


def test_priority_prefix_when_stdout_is_the_journal(tmp_path):
    lines = run_logging(tmp_path, "this")
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    warning = json.loads(lines[2][3:])
    assert warning["event"] == "w" and warning["level"] == "warning" and warning["camera"] == "cam0"


def test_plain_json_lines_otherwise(tmp_path):
    for journal in (None, "1:2"):  # not under systemd; or a journal stream that is not our stdout (a pipe)
        lines = run_logging(tmp_path, journal)
        assert [json.loads(line)["event"] for line in lines] == ["d", "i", "w", "e"]
