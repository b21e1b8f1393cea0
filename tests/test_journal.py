"""The results journal on a real directory: read back by seq, resume after a real SIGKILL mid-write, bounded size
with rotation, and a real write failure (the kernel's file-size limit, EFBIG, standing in for a full disk) that
degrades to an alarm while appends keep returning."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inspectd.daemon.journal import BOOT_ID, Journal
from inspectd.protocol import journal as journal_format
from inspectd.protocol.journal import JournalError, read_since
from inspectd.protocol.messages import decode_result, encode_result

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]


def result(camera: str, seq: int, mask: bytes | None = None) -> list[bytes]:
    return encode_result(
        station="s",
        camera=camera,
        seq=seq,
        frame_id=f"f{seq}",
        t_capture=1.0,
        t_publish=2.0,
        verdict="defect" if mask else "ok",
        score=0.5,
        threshold=0.4,
        model_id="m",
        thresholds_version=1,
        regions=[],
        latency_ms=1.0,
        width=4,
        height=4,
        mask_png=mask,
    )


def test_read_since_returns_exactly_the_later_results_as_published(tmp_path):
    j = Journal(tmp_path / "j", max_bytes=1 << 20)
    for seq in range(20):
        j.append("cam0", seq, result("cam0", seq, mask=b"PNG" * seq if seq % 5 == 0 else None))
        if seq % 2:
            j.append("cam1", seq // 2, result("cam1", seq // 2))
    got = list(j.read_since("cam0", 11))
    assert [s for s, _ in got] == list(range(12, 20))
    assert got[3][1] == result("cam0", 15, b"PNG" * 15)  # every multipart frame back, byte for byte
    assert decode_result(got[3][1]).mask_png == b"PNG" * 15
    assert [s for s, _ in j.read_since("cam1", -1)] == list(range(10))
    assert list(j.read_since("cam0", 19)) == []
    assert j.last_seq("cam0") == 19 and j.last_seq("cam1") == 9 and j.last_seq("cam9") is None
    j.close()
    # A second process (subscribe --since) reads the same directory without a writer.
    assert [s for s, _ in read_since(tmp_path / "j", "cam0", 16)] == [17, 18, 19]
    reopened = Journal(tmp_path / "j", max_bytes=1 << 20)
    assert reopened.last_seq("cam0") == 19 and not reopened.unclean
    with pytest.raises(JournalError, match="camera '../x'"):
        list(read_since(tmp_path / "j", "../x", 0))


def test_rotation_keeps_the_journal_under_its_cap_and_the_newest_results(tmp_path):
    cap = 256 << 10
    j = Journal(tmp_path / "j", max_bytes=cap, segment_bytes=32 << 10)
    payload = b"m" * 900
    for seq in range(2000):
        j.append("cam0", seq, result("cam0", seq, payload))
    j.flush()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "j").rglob("*.seg"))
    assert on_disk <= cap, on_disk
    assert on_disk > cap // 2  # it did not throw away more than it had to
    seqs = [s for s, _ in j.read_since("cam0", -1)]
    assert seqs[-1] == 1999 and seqs == list(range(seqs[0], 2000)), "a hole inside what is kept"
    assert journal_format.oldest_seq(tmp_path / "j", "cam0") == seqs[0] > 0
    assert journal_format.newest_seq(tmp_path / "j", "cam0") == 1999
    assert journal_format.newest_seq(tmp_path / "j", "cam1") is None
    j.close()


def test_status_from_another_thread_never_fails_while_the_publisher_rotates_segments(tmp_path):
    """The metrics and control threads call status() while the publishing thread rotates: its sum over the open
    segments met the dict changing size, and the scrape lost every inspectd_* series, `ctl status` its answer."""
    j = Journal(tmp_path / "j", max_bytes=64 << 20, segment_bytes=4096, camera_count=4)
    failures: list[str] = []
    calls = 0
    stop = threading.Event()

    def scrape() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                j.status()
            except Exception as exc:  # what the metrics collector met
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            calls += 1

    frames = {camera: result(camera, 0) for camera in ("cam0", "cam1", "cam2", "cam3")}
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL over often, as two busy threads on two cores contend for it
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        seq = 0
        deadline = time.monotonic() + 3.0  # some thousands of rotations
        while time.monotonic() < deadline and not failures:
            for camera, record in frames.items():
                j.append(camera, seq, record)
            seq += 1
    finally:
        stop.set()
        scraper.join()
        sys.setswitchinterval(switch)
    assert not failures, failures[0]
    assert calls > 1000 and j.written == 4 * seq
    j.flush()
    assert j.status()["bytes"] == sum(p.stat().st_size for p in (tmp_path / "j").rglob("*.seg"))
    j.close()


def test_status_counts_the_bytes_on_disk_through_rotation_trimming_and_a_reopen(tmp_path):
    cap = 128 << 10
    j = Journal(tmp_path / "j", max_bytes=cap, segment_bytes=16 << 10, camera_count=2)

    def on_disk() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "j").rglob("*.seg"))

    for seq in range(600):
        j.append("cam0", seq, result("cam0", seq, b"m" * 500))
        if seq % 3 == 0:
            j.append("cam1", seq, result("cam1", seq))
        if seq % 97 == 0:
            assert j.status()["bytes"] == on_disk(), seq
    assert j.status()["bytes"] == on_disk() <= cap
    j.close()
    reopened = Journal(tmp_path / "j", max_bytes=cap, segment_bytes=16 << 10, camera_count=2)
    assert reopened.status()["bytes"] == on_disk()
    for seq in range(600, 700):  # on in the segments the last run left open, then new ones
        reopened.append("cam0", seq, result("cam0", seq, b"m" * 500))
        reopened.append("cam1", seq, result("cam1", seq))
    assert reopened.status()["bytes"] == on_disk()
    reopened.close()


class _ClockGoingBack:
    """The time module as the journal sees it, with a wall clock that steps back at every reading."""

    def __init__(self) -> None:
        self.now = 2e9
        self.monotonic = time.monotonic

    def time(self) -> float:
        self.now -= 1000.0
        return self.now


def test_a_wall_clock_that_goes_back_never_trims_the_newest_results_first(tmp_path, monkeypatch):
    import inspectd.daemon.journal as journal_module

    cap, payload = 256 << 10, b"m" * 900
    monkeypatch.setattr(journal_module, "time", _ClockGoingBack())
    j = Journal(tmp_path / "j", max_bytes=cap, segment_bytes=32 << 10)
    for seq in range(2000):
        j.append("cam0", seq, result("cam0", seq, payload))
    seqs = [s for s, _ in j.read_since("cam0", -1)]
    assert seqs[-1] == 1999 and seqs == list(range(seqs[0], 2000)), "a hole inside what is kept"
    j.close()
    # At the next start the files' times say the opposite of their order (a clock set back between runs): the
    # journal still trims each camera's oldest segment first.
    segments = journal_module.segment_files(tmp_path / "j" / "cam0")
    for i, (_, path) in enumerate(segments):
        os.utime(path, (2e9 - 1000 * i, 2e9 - 1000 * i))
    j = Journal(tmp_path / "j", max_bytes=cap, segment_bytes=32 << 10)
    for seq in range(2000, 2600):
        j.append("cam0", seq, result("cam0", seq, payload))
    seqs = [s for s, _ in j.read_since("cam0", -1)]
    assert seqs[-1] == 2599 and seqs == list(range(seqs[0], 2600)), "a hole inside what is kept"
    j.close()


def test_after_the_clock_was_set_back_no_camera_loses_newer_results_while_another_keeps_older_ones(tmp_path):
    cap, segment, payload = 1 << 20, 32 << 10, b"m" * 900
    cameras = ["cam_a", "cam_b"]

    def run(seqs: range) -> None:
        j = Journal(tmp_path / "j", max_bytes=cap, segment_bytes=segment, camera_count=2)
        for seq in seqs:
            for camera in cameras:
                j.append(camera, seq, result(camera, seq, payload))
        j.close()

    run(range(0, 200))
    # Run 1 was stamped by a clock a year ahead (an RTC set wrong at boot), cam_b's writes just after cam_a's; then
    # NTP set it right.
    ahead = time.time() + 365 * 86400
    for c, camera in enumerate(cameras):
        for i, (_, path) in enumerate(journal_format.segment_files(tmp_path / "j" / camera)):
            os.utime(path, (ahead + 10 * i + c, ahead + 10 * i + c))
    run(range(200, 400))
    run(range(400, 700))  # the cap trims into run 2
    oldest = {camera: journal_format.oldest_seq(tmp_path / "j", camera) for camera in cameras}
    per_segment = segment // len(journal_format.encode_record(0, result("cam_a", 0, payload)))
    # Run 1's results went first for both, then run 2's in the order written: cam_a lost 200..367 while cam_b
    # still held 160..199.
    assert min(oldest.values()) >= 200 and abs(oldest["cam_a"] - oldest["cam_b"]) <= per_segment, oldest
    for camera in cameras:
        assert [s for s, _ in read_since(tmp_path / "j", camera, -1)] == list(range(oldest[camera], 700))


def test_many_cameras_share_the_cap_and_each_keeps_its_newest_results(tmp_path):
    cap = 1 << 20
    cameras = [f"cam{i}" for i in range(16)]
    j = Journal(tmp_path / "j", max_bytes=cap, camera_count=len(cameras))
    payload = b"m" * 900
    peak = 0
    for seq in range(400):
        for camera in cameras:
            j.append(camera, seq, result(camera, seq, payload))
        peak = max(peak, sum(p.stat().st_size for p in (tmp_path / "j").rglob("*.seg")))
    # An open segment per camera is never trimmed: with a segment of an eighth of the cap each, 16 cameras held
    # 2.8 times the cap and rotation left a camera two results.
    assert peak <= cap * 9 // 8, peak
    for camera in cameras:
        seqs = [s for s, _ in j.read_since(camera, -1)]
        assert seqs[-1] == 399 and len(seqs) >= 30, (camera, len(seqs))
    j.close()


# What the journal subprocesses below start with: the repository on the path and `res`, the same result as `result`.
SCRIPT_PRELUDE = """
import sys
sys.path.insert(0, {repo!r})
from inspectd.daemon.journal import BOOT_ID, Journal
from inspectd.protocol.messages import encode_result
def res(seq, mask=None):
    return encode_result(station="s", camera="cam0", seq=seq, frame_id="f", t_capture=1.0, t_publish=2.0,
                         verdict="defect" if mask else "ok", score=0.5, threshold=0.4, model_id="m",
                         thresholds_version=1, regions=[], latency_ms=1.0, width=4, height=4, mask_png=mask)
"""

WRITER = (
    SCRIPT_PRELUDE
    + """
import time
# The cap is far above what the writer can write before it is killed, so nothing is rotated away.
j = Journal(sys.argv[1], max_bytes=1 << 30, fsync_interval_s=0.05)
start = (j.last_seq("cam0") or -1) + 1
for seq in range(start, start + 10**7):
    j.append("cam0", seq, res(seq, mask=b"x" * 300))
    if seq == start + 200:
        print("going", flush=True)
"""
)


def test_sigkill_mid_append_then_reopen_resumes_after_the_last_whole_record(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    for round_ in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "j")], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"going\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The kill may itself have torn the last record (the kernel ends a write to a regular file at a page boundary
        # once a fatal signal is pending); a power cut mid-record leaves such a head too: put one there in any case.
        newest = sorted((tmp_path / "j" / "cam0").glob("*.seg"))[-1]
        whole = [end for end, _, _ in journal_format.read_records(newest)][-1]
        last_seq = [s for s, _ in read_since(tmp_path / "j", "cam0", -1)][-1]
        torn = journal_format.encode_record(last_seq + 1, result("cam0", last_seq + 1, b"t" * 300))
        with open(newest, "ab") as f:
            f.write(torn[: 10 if round_ == 0 else len(torn) * 2 // 3])  # round 0: mid-header, round 1: mid-body
        j = Journal(tmp_path / "j", max_bytes=1 << 30)
        assert j.unclean, "a killed writer must be noticed"
        assert newest.stat().st_size == whole, "the torn record was not cut off at open"
        seqs = [s for s, _ in j.read_since("cam0", -1)]
        # Every record up to the last one survived, in order, without a hole or a repeat across both kills.
        assert seqs == list(range(len(seqs))) and len(seqs) > 200 * (round_ + 1)
        assert j.last_seq("cam0") == seqs[-1]
        j.append("cam0", seqs[-1] + 1, result("cam0", seqs[-1] + 1))
        assert [s for s, _ in j.read_since("cam0", seqs[-1])] == [seqs[-1] + 1]
        j.close()


IN_FLIGHT = (
    SCRIPT_PRELUDE
    + """
j = Journal(sys.argv[1], max_bytes=1 << 30)
next_seq, _ = j.resume("cam0")
for seq in range(next_seq, next_seq + 50):   # 50 results published and journalled
    j.mark_accepted("cam0", seq)
    j.append("cam0", seq, res(seq))
for seq in range(next_seq + 50, next_seq + 57):   # 7 frames given a seq, still in flight
    j.mark_accepted("cam0", seq)
print(next_seq, flush=True)
sys.stdin.read()
"""
)


def test_frames_in_flight_at_a_sigkill_are_skipped_after_the_restart_not_reused(tmp_path):
    script = tmp_path / "in_flight.py"
    script.write_text(IN_FLIGHT.format(repo=str(REPO)))
    starts = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "j")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        starts.append(int(proc.stdout.readline()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # First run: seqs 0..49 journalled, 50..56 in flight. The second run resumes at 57, not 50.
    assert starts == [0, 57]
    j = Journal(tmp_path / "j", max_bytes=1 << 30)
    assert j.unclean and j.last_seq("cam0") == 57 + 49
    next_seq, skipped = j.resume("cam0")
    assert (next_seq, skipped) == (114, range(107, 114))
    journalled = [s for s, _ in j.read_since("cam0", -1)]
    assert journalled == list(range(50)) + list(range(57, 107))  # the gap is exactly the frames lost in flight
    j.close()

    clean = Journal(tmp_path / "j2", max_bytes=1 << 20)
    for seq in range(5):
        clean.mark_accepted("cam0", seq)
        clean.append("cam0", seq, result("cam0", seq))
    clean.close()
    reopened = Journal(tmp_path / "j2", max_bytes=1 << 20)
    assert not reopened.unclean and reopened.resume("cam0") == (5, range(5, 5))  # a clean stop skips nothing
    assert reopened.resume("cam9") == (0, range(0, 0))


def test_after_the_machine_restarted_numbering_resumes_past_the_synced_reservation_not_the_lost_mark(tmp_path):
    path = tmp_path / "j"
    first = Journal(path, max_bytes=1 << 20)
    for seq in range(300):  # seqs given out, each reserved (synced) before it was: 0 reserves to 256, 257 to 513
        first.mark_accepted("cam0", seq)
    for seq in range(290):
        first.append("cam0", seq, result("cam0", seq))
    assert (path / "cam0" / journal_format.RESERVED_MARK).read_bytes() == journal_format.ACCEPTED.pack(513)
    # The power goes: nothing closes the journal, and the accepted mark written after its last fsync is lost with
    # the page cache (rewound here to what a sync a while ago left); the machine boots again (another boot id).
    first._stop.set()
    first._syncer.join(5)
    (path / "cam0" / journal_format.ACCEPTED_MARK).write_bytes(journal_format.ACCEPTED.pack(100))
    (path / journal_format.BOOT_MARK).write_text("an-earlier-boot\n")
    after_power_cut = Journal(path, max_bytes=1 << 20)
    assert after_power_cut.unclean and after_power_cut.rebooted
    # 290..299 were given out (their frames in flight) and 300..513 might have been: none is given out again.
    assert after_power_cut.resume("cam0") == (514, range(290, 514))
    after_power_cut._stop.set()
    after_power_cut._syncer.join(5)

    # Killed before any frame came, and started again on the same boot: the marks are as the power cut left them,
    # and the seqs that may have gone out before it are still not given out again.
    killed = Journal(path, max_bytes=1 << 20)
    assert killed.unclean and not killed.rebooted
    assert killed.resume("cam0") == (514, range(290, 514))
    killed.close()


AFTER_REBOOT = (
    SCRIPT_PRELUDE
    + """
import os
j = Journal(sys.argv[1], max_bytes=1 << 20)
print(j.unclean, j.rebooted, *j.resume("cam0"), flush=True)
if sys.argv[2] == "stopped":
    j.close()    # an idle run stopped before the first frame: a clean close
else:
    os._exit(1)  # the start failed after the journal opened (an engine, a bind): nothing closes it
"""
)


@pytest.mark.parametrize("ending", ["stopped", "abandoned"])
def test_the_reboot_is_not_forgotten_when_the_first_run_after_it_gives_out_no_seq(tmp_path, ending):
    path = tmp_path / "j"
    first = Journal(path, max_bytes=1 << 20)
    for seq in range(300):  # reserved (synced) to 513
        first.mark_accepted("cam0", seq)
        first.append("cam0", seq, result("cam0", seq))
    first._stop.set()
    first._syncer.join(5)
    # The power cut: the accepted mark rewound to what an earlier sync left, then another boot.
    (path / "cam0" / journal_format.ACCEPTED_MARK).write_bytes(journal_format.ACCEPTED.pack(100))
    (path / journal_format.BOOT_MARK).write_text("an-earlier-boot\n")
    script = tmp_path / "after_reboot.py"
    script.write_text(AFTER_REBOOT.format(repo=str(REPO)))
    runs = [
        subprocess.run([sys.executable, str(script), str(path), ending], capture_output=True, text=True, timeout=30)
        for _ in range(2)
    ]
    assert [r.stdout.split() for r in runs] == [
        ["True", "True", "514", "range(300,", "514)"],
        # The second start is on the same boot: only the marks the first one left can keep 300..513 unused.
        [str(ending == "abandoned"), "False", "514", "range(300,", "514)"],
    ], [r.stderr for r in runs]


FULL_DISK = (
    SCRIPT_PRELUDE
    + """
import json
import inspectd.daemon.journal as jm
jm.RETRY_S = 0.0
j = Journal(sys.argv[1], max_bytes=64 << 20)
states = []
for seq in range(300):
    j.append("cam0", seq, res(seq, mask=b"x" * 1000))
    states.append(j.degraded is not None)
print(json.dumps({{"first_degraded": states.index(True), "status": j.status(), "last": j.last_seq("cam0")}}))
"""
)


def test_a_failing_disk_degrades_to_an_alarm_and_keeps_whole_records(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK.format(repo=str(REPO)))
    limit = 100_000  # bytes any one file may grow to: the kernel refuses the write beyond (EFBIG), as a full disk would

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "j")], capture_output=True, timeout=30, preexec_fn=cap_file_size
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    status = report["status"]
    assert status["degraded"] and "errno" in status["error"] and status["lost"] > 0
    assert status["written"] + status["lost"] == 300
    assert 0 < report["first_degraded"] < 300
    assert b"journal_degraded" in out.stdout
    # What did get written is whole: readable up to the last record the journal claims.
    seqs = [s for s, _ in read_since(tmp_path / "j", "cam0", -1)]
    assert seqs == list(range(report["last"] + 1)) and len(seqs) == status["written"]
    assert all(p.stat().st_size <= limit for p in (tmp_path / "j").rglob("*.seg"))


def test_an_unusable_directory_is_refused_naming_the_key(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(JournalError, match=r"^publish.journal.path .*file: cannot use it"):
        Journal(tmp_path / "file", max_bytes=1 << 20)


FILL_THEN_FREE = (
    SCRIPT_PRELUDE
    + """
import json, os, resource
from pathlib import Path
limit = int(sys.argv[2])
j = Journal(sys.argv[1], max_bytes=64 << 20, retry_s=0.0)
sizes, state = [], "filling"
for seq in range(400):
    if state == "filling" and j.degraded is not None:
        # Space returns: the soft limit goes back up, as a full disk gets room when something is deleted.
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        state = "freed"
    before = j.written
    j.append("cam0", seq, res(seq, mask=bytes([seq % 251]) * 1000))
    sizes.append(len(j.status()) and (j.written > before))
print(json.dumps({{"journalled": [s for s, ok in enumerate(sizes) if ok], "status": j.status()}}))
j.close()
"""
)


def test_a_record_torn_by_a_full_disk_is_cut_and_every_record_after_the_space_returns_replays(tmp_path):
    """The kernel writes up to RLIMIT_FSIZE and refuses the rest (EFBIG, as a full disk refuses with ENOSPC), so the
    record that meets the limit is really torn on disk. Then the limit is lifted and writing goes on."""
    script = tmp_path / "fill.py"
    script.write_text(FILL_THEN_FREE.format(repo=str(REPO)))
    limit = 100_000

    def cap_soft_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "j"), str(limit)],
        capture_output=True,
        timeout=60,
        preexec_fn=cap_soft_limit,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    journalled = report["journalled"]
    first_lost = next(s for s in range(400) if s not in journalled)
    record = len(journal_format.encode_record(0, result("cam0", 0, b"x" * 1000)))
    # The limit falls inside the record that failed: a partial write, not a clean refusal at a record boundary.
    assert first_lost * record < limit < (first_lost + 1) * record + 100
    assert journalled[-1] == 399 and len(journalled) > first_lost + 300  # writing resumed once space returned
    assert b"journal_degraded" in out.stdout and b"journal_recovered" in out.stdout
    # Every record the writer called journalled replays, in order, with its own bytes, in this process and after
    # a restart of the writer.
    for _ in range(2):
        replayed = list(read_since(tmp_path / "j", "cam0", -1))
        assert [s for s, _ in replayed] == journalled
        assert all(frames[2] == bytes([s % 251]) * 1000 for s, frames in replayed)
        reopened = Journal(tmp_path / "j", max_bytes=64 << 20)
        assert reopened.last_seq("cam0") == 399 and reopened.status()["corrupt"] == 0
        reopened.close()


def test_a_quiet_line_is_fsynced_on_the_timer_not_at_the_next_append(tmp_path):
    # The timer's first round comes half an interval after the open: time enough to see the record still owed.
    j = Journal(tmp_path / "j", max_bytes=1 << 20, fsync_interval_s=3.0)
    j.mark_accepted("cam0", 0)
    j.append("cam0", 0, result("cam0", 0))
    assert j.status()["unsynced"] == 1
    deadline = time.monotonic() + 10
    while j.status()["unsynced"] and time.monotonic() < deadline:
        time.sleep(0.02)
    # Nothing else was appended: only the timer can have synced it.
    assert j.status()["unsynced"] == 0 and j.status()["fsync_failed"] == 0
    j.close()


def test_a_mark_after_close_writes_nothing_and_opens_nothing(tmp_path):
    """An ingest thread that outlived the shutdown's grace may still mark a frame once the journal is closed."""
    j = Journal(tmp_path / "j", max_bytes=1 << 20)
    j.mark_accepted("cam0", 0)
    j.close()
    marks = {name: (tmp_path / "j" / "cam0" / name).read_bytes() for name in ("accepted", "reserved")}
    assert marks == {"accepted": journal_format.ACCEPTED.pack(0), "reserved": journal_format.ACCEPTED.pack(256)}
    fds = len(os.listdir("/proc/self/fd"))
    j.mark_accepted("cam0", 1000)  # past the reservation: would reserve again
    j.mark_accepted("cam1", 0)  # a camera never seen: would open its marks
    assert len(os.listdir("/proc/self/fd")) == fds
    assert {name: (tmp_path / "j" / "cam0" / name).read_bytes() for name in marks} == marks
    assert not (tmp_path / "j" / "cam1").exists()
    reopened = Journal(tmp_path / "j", max_bytes=1 << 20)
    assert not reopened.unclean and reopened.resume("cam0") == (1, range(0, 1))
    reopened.close()


def test_corruption_inside_a_segment_is_reported_and_the_records_after_it_are_kept(tmp_path, capsys):
    j = Journal(tmp_path / "j", max_bytes=1 << 20)
    for seq in range(30):
        j.append("cam0", seq, result("cam0", seq, b"m" * 200))
    j.close()
    (segment,) = (tmp_path / "j" / "cam0").glob("*.seg")
    sizes = [len(journal_format.encode_record(s, result("cam0", s, b"m" * 200))) for s in range(30)]
    at = sum(sizes[:10])
    data = bytearray(segment.read_bytes())
    data[at + sizes[10] // 2] ^= 0xFF  # flipped bits inside record 10's body: its CRC no longer matches
    segment.write_bytes(bytes(data))

    with pytest.raises(journal_format.JournalCorrupt, match=r"corrupt bytes at offset \d+"):
        list(read_since(tmp_path / "j", "cam0", -1))
    reported = []
    seqs = [s for s, _ in read_since(tmp_path / "j", "cam0", -1, on_corrupt=lambda *a: reported.append(a))]
    assert seqs == [s for s in range(30) if s != 10]
    assert reported == [(segment, at, sizes[10])]

    reopened = Journal(tmp_path / "j", max_bytes=1 << 20)  # the writer's recovery keeps what follows the damage
    assert reopened.last_seq("cam0") == 29 and reopened.status()["corrupt"] == 1
    assert "journal_corrupt_record" in capsys.readouterr().out
    reopened.append("cam0", 30, result("cam0", 30))
    reopened.close()
    assert [s for s, _ in read_since(tmp_path / "j", "cam0", 28, on_corrupt=lambda *a: None)] == [29, 30]


def _one_segment(path: Path, count: int, mask: bytes) -> Path:
    """A journal at `path` of results 0..count-1 on cam0, each accepted, closed cleanly: its one segment."""
    j = Journal(path, max_bytes=1 << 20)
    for seq in range(count):
        j.mark_accepted("cam0", seq)
        j.append("cam0", seq, result("cam0", seq, mask))
    j.close()
    (segment,) = (path / "cam0").glob("*.seg")
    return segment


def test_a_whole_last_record_that_fails_its_crc_is_corrupt_not_a_torn_tail(tmp_path, capsys):
    """A kill or a failed write cuts a record short; one whose whole length is there but whose CRC no longer matches
    is damage. Before, the open cut it as a torn tail without counting it, and readers ended there without a word.
    Now it is counted, logged and kept (the records appended after it are read past it), and readers report it;
    a record cut short is still cut at open."""
    path = tmp_path / "j"
    segment = _one_segment(path, 10, b"m" * 200)
    ends = [0] + [end for end, _, _ in journal_format.read_records(segment)]
    data = bytearray(segment.read_bytes())
    data[ends[-2] + 100] ^= 0x01  # inside the last record's body
    segment.write_bytes(bytes(data))
    with pytest.raises(journal_format.JournalCorrupt, match=rf"corrupt bytes at offset {ends[-2]}"):
        list(read_since(path, "cam0", -1))
    capsys.readouterr()
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.status()["corrupt"] == 1 and "journal_corrupt_record" in capsys.readouterr().out
    assert segment.stat().st_size == ends[-1]
    assert reopened.last_seq("cam0") == 8 and reopened.resume("cam0") == (10, range(9, 10))
    reopened.mark_accepted("cam0", 10)
    reopened.append("cam0", 10, result("cam0", 10))
    reopened.close()
    reported = []
    seqs = [s for s, _ in read_since(path, "cam0", -1, on_corrupt=lambda *a: reported.append(a))]
    assert seqs == [*range(9), 10] and reported == [(segment, ends[-2], ends[-1] - ends[-2])]
    with open(segment, "ab") as f:  # a record cut short at the end of the newest segment: a torn tail
        f.write(journal_format.encode_record(11, result("cam0", 11))[:30])
    torn = Journal(path, max_bytes=1 << 20)
    assert torn.status()["corrupt"] == 1 and torn.last_seq("cam0") == 10
    torn.close()
    assert [s for s, _ in read_since(path, "cam0", 9, on_corrupt=lambda *a: None)] == [10]
    assert segment.stat().st_size == [end for end, _, _ in journal_format.read_records(segment, lambda *_: None)][-1]


def test_a_segment_rotated_away_during_a_replay_is_reported_not_skipped_silently(tmp_path):
    j = Journal(tmp_path / "j", max_bytes=1 << 20, segment_bytes=8 << 10)
    for seq in range(100):
        j.append("cam0", seq, result("cam0", seq, b"m" * 500))
    j.close()
    segments = sorted((tmp_path / "j" / "cam0").glob("*.seg"))
    assert len(segments) >= 4
    rotated: list[Path] = []
    replay = read_since(tmp_path / "j", "cam0", -1, on_rotated=rotated.append)
    first = next(replay)  # the replay has listed the segments and is reading the first one
    segments[1].unlink()  # what the writer's rotation does meanwhile
    seqs = [first[0]] + [s for s, _ in replay]
    assert rotated == [segments[1]]
    taken = range(int(segments[1].stem), int(segments[2].stem))
    assert seqs == [s for s in range(100) if s not in taken]


TORN_AND_STUCK = (
    SCRIPT_PRELUDE
    + """
import json, resource
from pathlib import Path
j = Journal(sys.argv[1], max_bytes=300_000, segment_bytes=100_000, retry_s=0.0)
seq = 0
while j.degraded is None:  # small records up to the file size limit: the one that meets it is torn
    j.append("cam0", seq, res(seq, mask=b"x" * 1000))
    seq += 1
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
for _ in range(200):  # then larger ones: the torn segment has no room left for the next, so a new one starts
    j.append("cam0", seq, res(seq, mask=b"y" * 5000))
    seq += 1
j.close()
print(json.dumps({{"bytes": sum(p.stat().st_size for p in Path(sys.argv[1]).rglob("*.seg"))}}))
"""
)


def test_a_segment_whose_torn_record_could_not_be_cut_still_counts_against_the_cap(tmp_path):
    """A write torn by a full disk, and the ftruncate that should cut it failing too (strace answers EIO): the
    segment is retired as it is. It must still count against max_bytes and be trimmed in turn; it used to drop out
    of the accounting and stay on disk for good, the journal growing past its cap by a segment each time."""
    import shutil

    script = tmp_path / "torn.py"
    script.write_text(TORN_AND_STUCK.format(repo=str(REPO)))
    limit = 99_000  # near the segment's end: the torn segment cannot take the larger records that follow

    def cap_soft_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    strace = shutil.which("strace")
    assert strace, "strace is not installed: `make test` installs it (apt-get install strace)"
    command = [strace, "-f", "-o", "/dev/null", "-e", "inject=ftruncate:error=EIO", sys.executable, str(script)]
    out = subprocess.run([*command, str(tmp_path / "j")], capture_output=True, timeout=60, preexec_fn=cap_soft_limit)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert report["bytes"] <= 300_000, report
    seqs = [s for s, _ in read_since(tmp_path / "j", "cam0", -1)]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)) and len(seqs) > 20  # the newest, whole, in order


TRIM_FAILS = (
    SCRIPT_PRELUDE
    + """
import json
from pathlib import Path
j = Journal(sys.argv[1], max_bytes=300_000, segment_bytes=100_000, retry_s=0.0)
for seq in range(600):  # about 12 segments' worth through a cap of 3: deletes fail (strace)
    j.append("cam0", seq, res(seq, mask=b"x" * 1000))
j.close()
segments = list(Path(sys.argv[1]).rglob("*.seg"))
print(json.dumps({{"lost": j.lost, "bytes": sum(p.stat().st_size for p in segments), "segments": len(segments)}}))
"""
)


@pytest.mark.parametrize("failing", ["once", "always"])
def test_a_segment_whose_delete_fails_stays_counted_and_the_journal_goes_on(tmp_path, failing):
    """strace answers EIO to the first unlink, or to every one. A segment whose delete failed must stay in the
    accounting and go at a later trim; it used to leave the accounting first, staying on disk for good with a gap
    after it. And a delete that keeps failing must not stop the journal: the record being written, and every later
    one, would be lost."""
    import shutil

    script = tmp_path / "trim.py"
    script.write_text(TRIM_FAILS.format(repo=str(REPO)))
    strace = shutil.which("strace")
    assert strace, "strace is not installed: `make test` installs it (apt-get install strace)"
    when = "1" if failing == "once" else "1+"
    command = [strace, "-f", "-o", "/dev/null", "-e", f"inject=unlink:error=EIO:when={when}", sys.executable]
    out = subprocess.run([*command, str(script), str(tmp_path / "j")], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    seqs = [s for s, _ in read_since(tmp_path / "j", "cam0", -1)]
    assert report["lost"] == 0 and seqs[-1] == 599, report
    assert seqs == list(range(seqs[0], 600)), "an old segment was left behind, a gap after it"
    logged = out.stdout.decode().count("journal_segment_not_deleted")
    if failing == "once":
        assert report["bytes"] <= 300_000 and len(seqs) > 100 and logged == 1, report
    else:  # nothing could be deleted: every record kept, each segment named once
        assert len(seqs) == 600 and logged == report["segments"] - 1, (report, logged)


def test_a_journal_directory_renamed_and_replaced_while_writing_goes_on_in_the_configured_one(tmp_path, capsys):
    """`mv j j.old && mkdir j` under a running writer: what went into the moved segment stays there, whole (nothing
    lost), and the next round of the syncer sends the segments, the marks and the boot mark back to `j`, so the next
    start on `j` carries the numbering on instead of starting again at 0."""
    path = tmp_path / "j"
    journal = Journal(path, max_bytes=1 << 20, fsync_interval_s=0.2)

    def put(seqs: range) -> None:
        for seq in seqs:
            journal.mark_accepted("cam0", seq)
            journal.append("cam0", seq, result("cam0", seq))

    def synced() -> None:
        deadline = time.monotonic() + 10
        while journal.status()["unsynced"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert journal.status()["unsynced"] == 0

    put(range(50))
    synced()
    path.rename(tmp_path / "j.old")  # kept aside, a journal restored from a copy of a cleanly closed one in its place
    path.mkdir()
    (path / journal_format.CLEAN_MARK).touch()
    put(range(50, 60))  # into the moved segment, unless a round of the syncer found the move first
    synced()
    put(range(60, 100))
    status = journal.status()
    assert (status["written"], status["lost"], status["degraded"]) == (100, 0, False), status
    out = capsys.readouterr().out
    assert out.count("journal_directory_replaced") == 1 and "journal_segment_removed" not in out, out
    moved = [s for s, _ in read_since(tmp_path / "j.old", "cam0", -1)]
    assert 50 <= len(moved) <= 60 and moved == list(range(len(moved)))
    assert [s for s, _ in read_since(path, "cam0", -1)] == list(range(len(moved), 100))
    assert journal_format.read_mark(path / "cam0", journal_format.RESERVED_MARK) >= 99
    assert (path / journal_format.BOOT_MARK).exists() or not BOOT_ID.exists()
    assert not (path / journal_format.CLEAN_MARK).exists()  # a crash of this run must not look like a clean stop
    journal.close()
    assert (path / journal_format.CLEAN_MARK).exists()
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.resume("cam0") == (100, range(100, 100))
    reopened.close()


def test_a_journal_directory_renamed_just_before_close_still_leaves_the_numbering_in_the_configured_one(tmp_path):
    """The move comes after the syncer's last round: close finds it, and writes the marks into the configured
    directory, so the next start resumes past every seq given out (those in the moved folder a gap)."""
    path = tmp_path / "j"
    journal = Journal(path, max_bytes=1 << 20, fsync_interval_s=600)
    for seq in range(30):
        journal.mark_accepted("cam0", seq)
        journal.append("cam0", seq, result("cam0", seq))
    path.rename(tmp_path / "j.old")
    path.mkdir()
    journal.close()
    assert journal.status()["lost"] == 0
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.resume("cam0") == (30, range(0, 30))
    reopened.close()


@pytest.mark.parametrize("put_back", ["nothing", "a_clean_copy"])
def test_a_journal_directory_moved_on_an_idle_line_then_killed_numbers_on_in_the_configured_one(tmp_path, put_back):
    """`mv j j.old` (and maybe a backup, cleanly closed at seq 9, restored in its place) after the last frame: the
    syncer's next round, with nothing to sync, finds the move and writes the marks and the boot mark into `j` and
    removes the copy's clean mark, so a kill any time after that round leaves `j` numbering on past every seq given
    out, as an unclean stop, instead of from 0 or from the copy's marks taken for a clean stop."""
    import shutil

    path = tmp_path / "j"
    if put_back == "a_clean_copy":
        backup = Journal(tmp_path / "backup", max_bytes=1 << 20)
        for seq in range(10):
            backup.mark_accepted("cam0", seq)
            backup.append("cam0", seq, result("cam0", seq))
        backup.close()
    journal = Journal(path, max_bytes=1 << 20, fsync_interval_s=0.2)
    for seq in range(100):
        journal.mark_accepted("cam0", seq)
        journal.append("cam0", seq, result("cam0", seq))
    deadline = time.monotonic() + 10
    while journal.status()["unsynced"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert journal.status()["unsynced"] == 0
    path.rename(tmp_path / "j.old")
    if put_back == "a_clean_copy":
        shutil.copytree(tmp_path / "backup", path)

    def followed() -> bool:
        return (
            journal_format.read_mark(path / "cam0", journal_format.ACCEPTED_MARK) == 99
            and not (path / journal_format.CLEAN_MARK).exists()
            and ((path / journal_format.BOOT_MARK).exists() or not BOOT_ID.exists())
        )

    deadline = time.monotonic() + 3  # 30 rounds of the syncer; one is enough
    while not followed() and time.monotonic() < deadline:
        time.sleep(0.02)
    # The kill: nothing more of this run reaches the disk (what it wrote is in the page cache, which a kill keeps).
    journal._stop.set()
    journal._syncer.join(5)
    found = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    after_kill = Journal(path, max_bytes=1 << 20)
    assert after_kill.resume("cam0")[0] >= 100, (after_kill.resume("cam0"), found)  # no seq given out twice
    assert after_kill.unclean, "a kill must not look like a clean stop"
    if BOOT_ID.exists():  # else taken for a reboot: numbering resumes past the reservation, further on still
        first_copy_seq = 10 if put_back == "a_clean_copy" else 0
        assert not after_kill.rebooted and after_kill.resume("cam0") == (100, range(first_copy_seq, 100))
    after_kill.close()


def test_rotation_faster_than_fsync_keeps_the_descriptors_waiting_to_close_bounded(tmp_path, monkeypatch):
    """Segments of one record each (a small cap, results with masks) on a disk whose fsync takes 10 ms: rotation
    outruns the syncer, and the descriptors it leaves to close must not grow towards EMFILE."""
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.01)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    baseline = len(os.listdir("/proc/self/fd"))
    journal = Journal(tmp_path / "j", max_bytes=4 << 20, segment_bytes=1 << 10, fsync_interval_s=0.2)
    peak = 0
    for seq in range(300):
        journal.append("cam0", seq, result("cam0", seq, b"m" * 1500))
        peak = max(peak, len(os.listdir("/proc/self/fd")) - baseline)
    # At most MAX_PENDING_CLOSE waiting, as many more in the syncer's round, and the active segment with its dups.
    assert peak <= 2 * 64 + 16, peak
    assert journal.status()["lost"] == 0
    journal.close()
    assert [s for s, _ in read_since(tmp_path / "j", "cam0", -1)] == list(range(300))


def test_a_record_past_the_readers_limit_is_refused_counted_lost_and_told_once(tmp_path, monkeypatch, capsys):
    """The writer takes the readers' MAX_BODY (made small here, so the test need not build 256 MiB): a body past it
    is not written, where no reader would see it and the next start would cut it as torn, but counted lost."""
    monkeypatch.setattr(journal_format, "MAX_BODY", 4096)
    journal = Journal(tmp_path / "j", max_bytes=1 << 20)
    for seq in range(5):
        journal.append("cam0", seq, result("cam0", seq, b"m" * 5000 if seq in (1, 2) else None))
    status = journal.status()
    assert (status["written"], status["lost"]) == (3, 2), status
    out = capsys.readouterr().out
    assert out.count("journal_record_too_big") == 1 and "seq=1" in out, out
    assert [s for s, _ in read_since(tmp_path / "j", "cam0", -1)] == [0, 3, 4]
    journal._stop.set()  # no clean close: the next start checks the newest segment's tail
    journal._syncer.join(5)
    reopened = Journal(tmp_path / "j", max_bytes=1 << 20)
    assert "journal_torn_record_cut" not in capsys.readouterr().out
    assert [s for s, _ in read_since(tmp_path / "j", "cam0", -1)] == [0, 3, 4]
    reopened.close()


def test_a_replay_from_before_the_oldest_segment_is_told_rotated_from_its_own_listing(tmp_path):
    j = Journal(tmp_path / "j", max_bytes=1 << 20, segment_bytes=8 << 10)
    for seq in range(100):
        j.append("cam0", seq, result("cam0", seq, b"m" * 500))
    j.close()
    segments = sorted((tmp_path / "j" / "cam0").glob("*.seg"))
    segments[0].unlink()  # rotated away before the replay listed the segments
    rotated: list[Path] = []
    seqs = [s for s, _ in read_since(tmp_path / "j", "cam0", -1, on_rotated=rotated.append)]
    assert rotated == [segments[1]]
    assert seqs == list(range(int(segments[1].stem), 100))
    rotated.clear()
    assert [s for s, _ in read_since(tmp_path / "j", "cam0", int(segments[1].stem) - 1, on_rotated=rotated.append)]
    assert rotated == []  # from the oldest seq held: nothing rotated out of the range asked for


def test_a_journal_directory_removed_on_an_idle_line_and_then_stopped_still_carries_the_numbering_on(tmp_path):
    """The folder goes (an operator freeing space) after the last frame, and the daemon stops before another: close
    finds the segment deleted and writes the marks into the re-created folder, so the next start numbers on past
    every seq given out (what was in the folder a gap, counted lost) instead of from 0 as after a wipe."""
    import shutil

    path = tmp_path / "j"
    journal = Journal(path, max_bytes=1 << 20, fsync_interval_s=600)
    for seq in range(30):
        journal.mark_accepted("cam0", seq)
        journal.append("cam0", seq, result("cam0", seq))
    shutil.rmtree(path)
    journal.close()
    assert journal.status()["lost"] == 30
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.resume("cam0") == (30, range(0, 30))
    reopened.close()


@pytest.mark.parametrize("failing", [2, 5], ids=["segments", "marks"])
def test_a_dup_that_fails_part_way_leaks_no_descriptor_and_keeps_the_marks_to_fsync(tmp_path, monkeypatch, failing):
    """A round duplicates each active segment's and each dirty mark's descriptor to fsync them outside the lock: one
    failing part way (EMFILE) left the ones already made open for good, and the marks it had taken off the dirty set
    were never fsynced."""
    journal = Journal(tmp_path / "j", 2**22, fsync_interval_s=3600)  # no syncer round of its own: driven here
    for camera in ("cam0", "cam1", "cam2"):
        journal.mark_accepted(camera, 1)
        journal.append(camera, 1, result(camera, 1))
    journal.sync()
    for camera in ("cam0", "cam1", "cam2"):
        journal.mark_accepted(camera, 2)
    before = len(os.listdir("/proc/self/fd"))
    real, calls = os.dup, [0]

    def dup(fd):
        calls[0] += 1
        if calls[0] == failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(fd)

    monkeypatch.setattr(os, "dup", dup)
    with pytest.raises(OSError):
        journal.sync()
    monkeypatch.setattr(os, "dup", real)
    assert len(os.listdir("/proc/self/fd")) == before
    assert sorted(journal._marks_dirty) == ["cam0", "cam1", "cam2"]
    journal.close()


def test_a_newest_segment_ending_in_a_page_of_zeros_is_a_torn_tail_cut_without_a_corrupt_count(tmp_path, capsys):
    """What a power cut can leave on a file system that allocates before it writes: the segment's new size on disk,
    its last pages zeros. A tear, not damage: cut at open as a kill's torn record is, nothing counted as corrupt."""
    path = tmp_path / "j"
    segment = _one_segment(path, 40, b"m" * 300)
    ends = [end for end, _, _ in journal_format.read_records(segment)]
    page = journal_format.PAGE * (ends[-1] // journal_format.PAGE)
    kept = [end for end in ends if end <= page]
    assert len(kept) < len(ends), ends  # some record lies across that page boundary
    data = bytearray(segment.read_bytes())
    data[page:] = bytes(len(data) - page)
    segment.write_bytes(bytes(data))
    assert [s for s, _ in read_since(path, "cam0", -1)] == list(range(len(kept)))  # no JournalCorrupt
    capsys.readouterr()
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.status()["corrupt"] == 0 and "journal_corrupt_record" not in capsys.readouterr().out
    assert segment.stat().st_size == kept[-1] and reopened.last_seq("cam0") == len(kept) - 1
    reopened.close()
