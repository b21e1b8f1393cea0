"""What a power cut may cost, observed in the system calls of a real daemon rather than in its counters.

No test here cuts the power. A power cut keeps what was fsynced and may drop anything else, so what survives one is
decided by which fsyncs the daemon makes and when. `inspectd run` runs under strace (every fsync, write, pwrite,
openat, mkdir, unlink and rename of every thread, each with its time, thread and the path behind its descriptor)
with a journal configured only by its size. Four bursts of frames go through it, a second apart (each rotates to a
new segment; the cap deletes the oldest), then the line goes quiet, and only after that quiet spell is the daemon
stopped. From the trace: every record written to a segment and every accepted mark is fsynced within the journal's
`fsync_interval_s` (the default, 1 s), the last ones during the quiet spell, not at the next append or at shutdown;
the thread that writes records never fsyncs; the parent directory of every segment, mark and directory the journal
created or deleted is fsynced after that. Then a second daemon, with a config that says nothing about the journal,
resumes the numbering after the first one's last seq.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from daemon_harness import Station
from inspectd.daemon.config import load_config, parse_config
from inspectd.daemon.journal import Journal
from inspectd.protocol.journal import ACCEPTED, ACCEPTED_MARK, CLEAN_MARK
from station_model import FRAME, write_grey_bundle

# An fsync's end is bounded in time: another worker's disk traffic would lengthen it.
pytestmark = [pytest.mark.timeout(180), pytest.mark.exclusive]

REPO = Path(__file__).resolve().parents[1]
FRAMES = 600  # about 4 segments of 64 kB: rotation creates segments and the 0.2 MB cap deletes the oldest
BURSTS = 4  # FRAMES arrive in this many bursts, each rotating to a new segment
INTERVAL = 1.0  # publish.journal.fsync_interval_s's default, which the traced daemon keeps
QUIET = 3 * INTERVAL  # how long the line stays quiet before the daemon is stopped
TRACED = "fsync,fdatasync,openat,write,pwrite64,mkdir,mkdirat,unlink,unlinkat,rename,renameat,renameat2"


@dataclass
class Call:
    tid: int
    start: float  # epoch seconds at entry
    end: float  # at return
    name: str
    args: str
    ret: str

    def fd_path(self) -> Path | None:
        """The path strace -y shows behind the first argument (a descriptor)."""
        m = re.match(r"-?\d+<([^>]*)>", self.args)
        return Path(m.group(1)) if m else None

    def target(self) -> Path | None:
        """The file an openat returned, or the name a mkdir/unlink/rename (its source) was given."""
        if self.name == "openat":
            m = re.match(r"\d+<([^>]*)>", self.ret)
            return Path(m.group(1)) if m else None
        m = re.search(r'"((?:[^"\\]|\\.)*)"', self.args)
        return Path(m.group(1)) if m else None


LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
DONE = re.compile(r"^(?P<args>.*)\)\s+=\s+(?P<ret>.*?)(?:\s+<(?P<took>\d+\.\d+)>)?$")


def parse_trace(text: str) -> tuple[list[Call], dict[str, float]]:
    """strace -f -ttt -T -y output: the completed calls, and when each signal arrived (first time per name)."""
    calls: list[Call] = []
    signals: dict[str, float] = {}
    pending: dict[int, tuple[str, float, str]] = {}
    for raw in text.splitlines():
        m = LINE.match(raw)
        if not m:
            continue
        tid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.startswith("---"):
            name = rest.split()[1]
            signals.setdefault(name, t)
            continue
        if rest.startswith("+++"):
            continue
        if rest.startswith("<..."):
            name = rest[5:].split()[0]
            if tid not in pending:
                continue
            call_name, start, head = pending.pop(tid)
            tail = rest.split("resumed>", 1)[1]
            done = DONE.match(tail)
            if done:
                calls.append(Call(tid, start, t, call_name, head + done.group("args"), done.group("ret")))
            continue
        name, _, args = rest.partition("(")
        if rest.endswith("<unfinished ...>"):
            pending[tid] = (name, t, args[: -len("<unfinished ...>")].rstrip())
            continue
        done = DONE.match(args)
        if done:
            took = float(done.group("took") or 0)
            calls.append(Call(tid, t, t + took, name, done.group("args"), done.group("ret")))
    return calls, signals


def unescape(text: str) -> bytes:
    """A string as strace -x prints it: printable characters as themselves, the rest as \\xNN or C escapes."""
    out = bytearray()
    i = 0
    simple = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, '"': 34, "\\": 92}
    while i < len(text):
        if text[i] == "\\":
            if text[i + 1] == "x":
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            out.append(simple[text[i + 1]])
            i += 2
            continue
        out.append(ord(text[i]))
        i += 1
    return bytes(out)


def strace() -> str:
    # Installed by `make test` (its `strace` prerequisite), as chromium is for the browser test: never skipped.
    path = shutil.which("strace")
    assert path, "strace is not installed: `make test` installs it (apt-get install strace)"
    return path


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """One traced daemon run: (calls, signals, state_dir, seqs published, the second daemon's seqs)."""
    tmp = tmp_path_factory.mktemp("power")
    bundle = write_grey_bundle(tmp / "bundle")
    trace = tmp / "strace.txt"
    endpoint = f"ipc://{tmp}/cam0-frames.sock"
    camera = {"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint}, "queue": {"policy": "block"}}
    wrap = (strace(), "-f", "-ttt", "-T", "-y", "-x", "-s", "8", "--seccomp-bpf", "-e", f"trace={TRACED}")
    station = Station(
        tmp,
        bundle,
        [camera],
        wrap=(*wrap, "-o", str(trace)),
        publish={"journal": {"max_mb": 0.2}},  # only the size: enabled, path and fsync_interval_s are the defaults
    )
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    try:
        station.wait_ready(120)
        push.connect(endpoint)
        image = np.full((FRAME, FRAME), 128, np.uint8)
        results = []
        for burst in range(BURSTS):
            if burst:
                # Each burst in a syncer interval of its own, so what one burst created or deleted is fsynced for
                # its own sake, not by the sync that an earlier change asked for.
                time.sleep(INTERVAL)
            for i in range(burst * FRAMES // BURSTS, (burst + 1) * FRAMES // BURSTS):
                header = {"frame_id": f"f{i}", "t_capture": time.time(), "dtype": "uint8", "encoding": "raw"}
                push.send_multipart([json.dumps({**header, "shape": [FRAME, FRAME]}).encode(), image.tobytes()])
            results += station.results(FRAMES // BURSTS, 60)
        assert len(results) == FRAMES, f"{len(results)} of {FRAMES} results; log:\n{station.log_tail()}"
        time.sleep(QUIET)  # the line is quiet: nothing is appended, nothing is marked
        assert station.stop() == 0, station.log_tail()
    finally:
        station.close()

    # The same state dir under a config with no journal section at all: the default keeps the numbering going.
    again = Station(tmp, bundle, [camera], wrap=(*wrap, "-o", str(tmp / "strace-again.txt")))
    assert "journal" not in again.config["publish"]
    try:
        again.wait_ready(120)
        time.sleep(INTERVAL)  # no frame yet: what the open itself changed must be fsynced for its own sake
        for i in range(3):  # the PUSH socket reconnects to the new daemon's camera by itself
            header = {"frame_id": f"g{i}", "t_capture": time.time(), "dtype": "uint8", "encoding": "raw"}
            push.send_multipart([json.dumps({**header, "shape": [FRAME, FRAME]}).encode(), image.tobytes()])
        later = again.results(3, 30)
        resumed = again.events("seq_resumed")
        assert again.stop() == 0, again.log_tail()
    finally:
        again.close()
        push.close(0)
    calls, signals = parse_trace(trace.read_text(errors="replace"))
    calls_again, _ = parse_trace((tmp / "strace-again.txt").read_text(errors="replace"))
    return calls, signals, tmp / "state", [r.seq for r in results], [r.seq for r in later], resumed, calls_again


def fsyncs_of(calls: list[Call], path: Path, after: float) -> list[Call]:
    return [c for c in calls if c.name in ("fsync", "fdatasync") and c.fd_path() == path and c.start >= after]


def test_a_quiet_lines_last_records_are_fsynced_within_the_interval_by_the_timer_not_at_shutdown(traced):
    calls, signals, state, seqs, _, _, _ = traced
    assert seqs == list(range(FRAMES))
    journal = state / "journal" / "cam0"
    writes = [c for c in calls if c.name == "write" and (p := c.fd_path()) and p.parent == journal]
    assert writes and all(c.fd_path().suffix == ".seg" for c in writes), "no record written under the default path"
    assert len(writes) == FRAMES  # one write() per record: a SIGKILL never splits one
    stop = signals["SIGTERM"]
    last = writes[-1]
    assert stop - last.end > QUIET * 0.9  # the quiet spell really was one
    synced = fsyncs_of(calls, last.fd_path(), last.end)
    assert synced, "the last record was never fsynced"
    lag = synced[0].end - last.end
    print(f"last record fsynced {lag:.3f} s after its write (bound {INTERVAL} s)")
    assert synced[0].end < stop, "the last record was fsynced only at shutdown"
    assert lag <= INTERVAL
    # Every record, in whichever segment it went (including those rotation closed): fsynced within the bound.
    worst = max(fsyncs_of(calls, w.fd_path(), w.end)[0].end - w.end for w in writes)
    print(f"largest lag from a record's write to its fsync: {worst:.3f} s")
    assert worst <= INTERVAL
    # Off the publishing thread: the thread that writes the records never waits for the disk while it publishes.
    publisher = {w.tid for w in writes}
    assert not [c for c in calls if c.name in ("fsync", "fdatasync") and c.tid in publisher and c.start < stop]


def test_the_directory_of_every_segment_mark_and_camera_directory_created_or_deleted_is_fsynced_after_it(traced):
    calls, signals, state, _, _, _, _ = traced
    journal = state / "journal"
    stop = signals["SIGTERM"]
    created = {}
    for c in calls:
        target = c.target()
        if c.name == "openat" and "O_CREAT" in c.args and target and target.is_relative_to(journal):
            created.setdefault(target, c)
    segments = sorted(p for p in created if p.suffix == ".seg")
    assert len(segments) >= 3, f"only {len(segments)} segments: no rotation"
    assert journal / "cam0" / ACCEPTED_MARK in created
    deleted = [c for c in calls if c.name in ("unlink", "unlinkat") and (t := c.target()) and t.suffix == ".seg"]
    assert deleted, "the cap deleted no segment"
    # The camera's directory, and on a first start the journal's and the state dir's (mkdir -p from the journal).
    made = [c for c in calls if c.name in ("mkdir", "mkdirat") and c.ret == "0"]
    made = [c for c in made if c.target() in (state, journal, journal / "cam0")]
    assert sorted(c.target() for c in made) == [state, journal, journal / "cam0"]
    changes = [*[(p, c) for p, c in created.items() if c.start < stop], *[(c.target(), c) for c in deleted + made]]
    for path, change in changes:
        synced = fsyncs_of(calls, path.parent, change.end)
        assert synced, f"{path.parent} never fsynced after {change.name} of {path.name}"
        assert synced[0].end - change.end <= INTERVAL, f"{path.name}: {synced[0].end - change.end:.3f} s"
    # The clean mark left at shutdown is an empty file: its directory entry is what must reach the disk.
    clean = created[journal / CLEAN_MARK]
    assert clean.start > stop and fsyncs_of(calls, journal, clean.end)


def test_the_accepted_mark_is_rewritten_in_place_and_fsynced_within_the_interval_of_its_last_write(traced):
    calls, signals, state, seqs, _, _, _ = traced
    mark = state / "journal" / "cam0" / ACCEPTED_MARK
    stop = signals["SIGTERM"]
    pwrites = [c for c in calls if c.name == "pwrite64" and c.fd_path() == mark]
    assert len(pwrites) == FRAMES  # one per frame, before the frame is queued
    value = re.match(r'-?\d+<[^>]*>,\s+"((?:[^"\\]|\\.)*)"', pwrites[-1].args)
    assert value and ACCEPTED.unpack(unescape(value.group(1)))[0] == seqs[-1]
    # No tmp file and rename: 8 bytes at offset 0 of the same file, so there is no rename to order an fsync before.
    assert not [c for c in calls if c.name.startswith("rename") and ACCEPTED_MARK in c.args]
    assert not [c for c in calls if c.name == "openat" and ACCEPTED_MARK in c.args and "O_TRUNC" in c.args]
    last = pwrites[-1]
    synced = fsyncs_of(calls, mark, last.end)
    assert synced and synced[0].end < stop, "the last accepted mark was fsynced only at shutdown, or never"
    print(f"last accepted mark fsynced {synced[0].end - last.end:.3f} s after its write")
    assert synced[0].end - last.end <= INTERVAL
    worst = max(fsyncs_of(calls, mark, p.end)[0].end - p.end for p in pwrites)
    assert worst <= INTERVAL, f"a mark waited {worst:.3f} s for its fsync"


def test_a_daemon_whose_config_leaves_out_the_journal_keeps_one_and_resumes_the_numbering(traced):
    _, _, state, seqs, later, resumed, calls = traced
    assert later == [seqs[-1] + 1, seqs[-1] + 2, seqs[-1] + 3]
    assert resumed and resumed[-1]["next_seq"] == FRAMES and not resumed[-1]["unclean_shutdown"]
    assert (state / "journal" / "cam0").is_dir()
    # The clean mark the first daemon left is removed at open, and the removal is fsynced within the interval: else a
    # power cut could make this run, which never closed, look clean at the next start.
    journal = state / "journal"
    (removed,) = [c for c in calls if c.name in ("unlink", "unlinkat") and c.target() == journal / CLEAN_MARK]
    assert removed.ret == "0"
    synced = fsyncs_of(calls, journal, removed.end)
    assert synced and synced[0].end - removed.end <= INTERVAL
    first_mark = [c for c in calls if c.name == "pwrite64" and c.fd_path() == journal / "cam0" / ACCEPTED_MARK][0]
    assert synced[0].end < first_mark.start  # not only because the first frame's mark opened a file there


def test_closing_a_station_whose_daemon_runs_under_strace_ends_the_daemon_too(tmp_path):
    camera = {"id": "cam0", "source": {"kind": "zmq", "endpoint": f"ipc://{tmp_path}/frames.sock"}}
    bundle = write_grey_bundle(tmp_path / "bundle")
    station = Station(tmp_path, bundle, [camera], wrap=(strace(), "-f", "-o", "/dev/null"))
    try:
        station.wait_ready(120)
        daemon = station.daemon_pid
    finally:
        station.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{daemon}").exists() and "zombie" not in Path(f"/proc/{daemon}/status").read_text():
        assert time.monotonic() < deadline, "the daemon outlived its strace and the station"
        time.sleep(0.05)


def test_the_default_and_the_example_config_keep_a_journal_under_the_state_dir(tmp_path):
    minimal = {"station": "s", "model": {"bundle": "b"}, "cameras": [{"id": "c", "source": {"kind": "synthetic"}}]}
    config = parse_config(minimal, base_dir=tmp_path)
    assert config.publish.journal.enabled and config.publish.journal.fsync_interval_s == 1.0
    assert config.journal_path == config.state_dir / "journal"
    example = load_config(REPO / "deploy" / "inspectd.example.yaml")
    assert example.journal_path == example.state_dir / "journal" and example.publish.journal.fsync_interval_s == 1.0
    raw = yaml.safe_load((REPO / "deploy" / "inspectd.example.yaml").read_text())
    assert raw["publish"]["journal"]["enabled"] is True


def test_the_trace_parser_reads_unfinished_calls_and_signals():
    text = (
        '7 100.000100 write(5</j/cam0/000000000000.seg>, "IJ\\x01\\x00", 40) = 40 <0.000010>\n'
        "8 100.000200 fsync(9</j/cam0/000000000000.seg> <unfinished ...>\n"
        '7 100.000300 pwrite64(6</j/cam0/accepted>, "\\x05\\x00\\x00\\x00\\x00\\x00\\x00\\x00", 8, 0) = 8 <0.000005>\n'
        "8 100.250000 <... fsync resumed>) = 0 <0.249800>\n"
        "7 101.000000 --- SIGTERM {si_signo=SIGTERM, si_code=SI_USER, si_pid=1, si_uid=0} ---\n"
        "7 101.5 +++ exited with 0 +++\n"
    )
    calls, signals = parse_trace(text)
    assert [(c.tid, c.name) for c in calls] == [(7, "write"), (7, "pwrite64"), (8, "fsync")]
    assert (calls[2].start, calls[2].end) == (100.0002, 100.25)
    assert calls[2].fd_path() == Path("/j/cam0/000000000000.seg")
    assert unescape(re.search(r'"(.*)"', calls[1].args).group(1)) == ACCEPTED.pack(5)
    assert signals == {"SIGTERM": 101.0}
    assert subprocess.run([strace(), "-V"], capture_output=True).returncode == 0


def test_a_sync_round_that_raises_is_logged_and_the_next_round_syncs(tmp_path, capsys):
    """The syncer is the only thing that fsyncs a quiet line: one round that raises (a set of marks changed while the
    round read it raises RuntimeError) must not end it."""
    journal = Journal(tmp_path / "j", max_bytes=1 << 20, fsync_interval_s=0.05)
    real, rounds = journal.sync, []

    def sync_failing_once() -> None:
        rounds.append(time.monotonic())
        if len(rounds) == 1:
            raise RuntimeError("injected: Set changed size during iteration")
        real()

    journal.sync = sync_failing_once  # type: ignore[method-assign]
    journal.mark_accepted("cam0", 0)
    journal.append("cam0", 0, [b"topic", b"{}"])
    deadline = time.monotonic() + 10
    while journal.status()["unsynced"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(rounds) >= 2 and journal.status()["unsynced"] == 0 and journal.alive()
    assert journal.status()["fsync_failed"] == 1
    assert "journal_sync_failed" in capsys.readouterr().out
    del journal.sync
    journal.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected end, on purpose
def test_a_journal_syncer_that_ends_anyway_makes_the_daemon_unhealthy(tmp_path):
    from inspectd.daemon.service import Daemon

    config = parse_config(
        {
            "station": "p1",
            "model": {"bundle": str(write_grey_bundle(tmp_path / "bundle"))},
            "engine": {"options": {"intra_op_threads": 1}},
            "cameras": [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 50, "width": 64, "height": 64}}],
            "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock", "journal": {"fsync_interval_s": 0.05}},
            "control": {"endpoint": f"ipc://{tmp_path}/control.sock"},
            "metrics": {"listen": None},
            "state_dir": str(tmp_path / "state"),
        }
    )
    daemon = Daemon(config)
    daemon.start()
    journal = daemon.journal
    assert journal is not None
    try:
        deadline = time.monotonic() + 30
        while daemon.publisher.published < 5:
            assert time.monotonic() < deadline, "no results"
            time.sleep(0.05)
        assert daemon.dead_threads() == [] and daemon.status()["healthy"]

        def crash() -> None:
            raise SystemExit("injected: the syncer ends")  # what no `except Exception` catches

        journal.sync = crash  # type: ignore[method-assign]
        while daemon.dead_threads() != ["journal-sync"]:
            assert time.monotonic() < deadline + 10, daemon.dead_threads()
            time.sleep(0.05)
        assert not daemon.progressing() and daemon.status()["healthy"] is False
    finally:
        journal.__dict__.pop("sync", None)
        daemon.shutdown()


def test_a_bridges_state_file_is_fsynced_before_its_rename_and_its_directory_after(tmp_path):
    """The restart rule's state (the Modbus bridge's acked.json, the OPC UA server's state_file) goes through one
    writer: traced, the new content is fsynced before it is renamed over the old, and the directory after."""
    target = tmp_path / "state.json"
    target.write_text('{"cam0": {"inspection_id": 4}}')
    trace = tmp_path / "trace.txt"
    code = (
        "import sys; from pathlib import Path; from inspectd.durable import replace_file; "
        'replace_file(Path(sys.argv[1]), b\'{"cam0": {"inspection_id": 5}}\')'
    )
    wrap = (strace(), "-f", "-ttt", "-T", "-y", "-x", "-s", "8", "-e", f"trace={TRACED}", "-o", str(trace))
    subprocess.run([*wrap, sys.executable, "-c", code, str(target)], check=True, cwd=REPO, timeout=60)
    calls, _ = parse_trace(trace.read_text(errors="replace"))
    temporary = target.with_name(target.name + ".tmp")
    written = [c for c in calls if c.name == "fsync" and c.fd_path() == temporary]
    renamed = [c for c in calls if c.name.startswith("rename") and c.target() == temporary]
    assert written and renamed, "no fsync of the new content, or no rename over the old"
    assert written[0].end <= renamed[0].start
    assert fsyncs_of(calls, tmp_path, renamed[0].end), f"{tmp_path} not fsynced after the rename"
    assert json.loads(target.read_text()) == {"cam0": {"inspection_id": 5}}
    assert not temporary.exists()
