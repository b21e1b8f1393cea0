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


def run_logging(tmp_path: Path, journal: str | None, script: str = SCRIPT, *args: str) -> list[str]:
    out = tmp_path / "stdout"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    with open(out, "wb") as f:
        if journal == "this":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal is not None:
            env["JOURNAL_STREAM"] = journal
        subprocess.run([sys.executable, "-c", script, *args], stdout=f, env=env, check=True, timeout=60)
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


CAMERAS = """
import os, sys, time
from inspectd.logs import configure_logging
from inspectd.daemon.config import parse_config
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest

configure_logging("info", "json")
watched, alias, absent = sys.argv[1:]
cameras = parse_config({"station": "s", "model": {"bundle": "b"}, "cameras": [
    {"id": "gone", "source": {"kind": "folder", "path": absent}},
    {"id": "fatal", "source": {"kind": "folder", "path": watched, "done_dir": alias}},
    {"id": "line", "source": {"kind": "synthetic", "width": 8, "height": 8}},
]}).cameras
os.symlink(watched, alias)  # after the load, which refuses the watched folder as done_dir: the open fails for good
ingests = [CameraIngest(cam, FrameQueue(8, "drop_oldest"), backoff_s=(0.05, 0.1)) for cam in cameras]
for ingest in ingests:
    ingest.start()
deadline = time.monotonic() + 20
while time.monotonic() < deadline and [i.state for i in ingests] != ["reopening", "failed", "running"]:
    time.sleep(0.02)
for ingest in ingests:
    ingest.stop()
    ingest.join(10)
"""


def test_a_camera_that_lost_its_source_is_a_warning_and_one_failed_for_good_an_error(tmp_path):
    """`journalctl -u inspectd -p warning` must show a camera that is reopening, and one that failed for good (a
    misconfiguration no retry mends) as an error: every camera_state was logged at info, so a station with a dead
    camera showed nothing there."""
    watched = tmp_path / "watched"
    watched.mkdir()
    lines = run_logging(tmp_path, "this", CAMERAS, str(watched), str(tmp_path / "alias"), str(tmp_path / "absent"))
    states = {}
    for line in lines:
        event = json.loads(line[3:])
        if event["event"] == "camera_state":
            states.setdefault((event["camera"], event["state"]), (line[:3], event["level"]))
    assert states[("gone", "reopening")] == ("<4>", "warning"), states
    assert states[("fatal", "failed")] == ("<3>", "error"), states
    assert states[("line", "running")] == ("<6>", "info"), states
    assert states[("line", "stopped")] == ("<6>", "info"), states


def test_a_line_stdout_cannot_take_is_lost_and_counted_and_a_bad_record_is_still_said(tmp_path):
    """With stdout's reader gone, a log call raised BrokenPipeError in the thread that logged (the control thread, a
    reload, the stop). Such lines are lost and counted; a record that cannot be formatted is not a lost line and is
    still reported as logging reports it."""
    script = """
import logging, os, sys
import structlog
from inspectd.logs import configure_logging, lines_lost
read, write = os.pipe()
os.close(read)
sys.stdout = os.fdopen(write, "w")
configure_logging("info", "json", stdlib=("lib",))
structlog.get_logger("t").info("one")
structlog.get_logger("t").warning("two")
logging.getLogger("lib").warning("three")
print(lines_lost(), file=sys.stderr)
logging.getLogger("lib").warning("%s and %s", "one argument")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.stderr.splitlines()[0] == "3", done.stderr
    assert "--- Logging error ---" in done.stderr and "not enough arguments" in done.stderr, done.stderr
