"""The image archive: the writer on real files and a real SQLite index (and on a real 3 MB tmpfs, mounted as root, to
fill), a real daemon archiving what it publishes, and `inspectd archive list|export` feeding `inspectd calibrate`,
each as a real subprocess."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

from daemon_harness import Station, in_process_config
from engines.schema import show
from inspectd.clients import archive as archive_cli
from inspectd.daemon import archive as archive_module
from inspectd.daemon.archive import Archive
from inspectd.daemon.inference import Judged
from inspectd.daemon.service import Daemon
from inspectd.protocol import archive as fmt
from inspectd.protocol.archive import ArchiveError, ArchiveReader, live_frame
from other_user import as_nobody
from ports import free_port
from station_model import FRAME, defect_frame, drop, good_frame, judged, write_grey_bundle

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


def test_defects_with_overlays_and_one_good_frame_in_n_are_kept(tmp_path):
    archive = Archive(tmp_path / "archive", max_mb=100, max_age_h=24, good_every=3).start()
    offered = []
    for seq in range(12):
        image = defect_frame(seq) if seq in (4, 9) else good_frame(seq)
        item = judged("cam0", seq, image)
        offered.append((item, archive.offer(item)))
    assert archive.close()
    kept = {item.frame.seq: entry_id for item, entry_id in offered if entry_id}
    # The good frames are seq 0-3, 5-8, 10, 11: the 1st, 4th, 7th and 10th of them are kept, and both defects.
    assert sorted(kept) == [0, 3, 4, 7, 9, 11], kept
    status = archive.status()
    assert status["written"] == {"ok": 4, "defect": 2} and status["lost"] == 0 and not status["degraded"]

    with ArchiveReader(tmp_path / "archive") as reader:
        entries = reader.query()
        assert [e.seq for e in entries] == sorted(kept)
        assert [e.seq for e in reader.query(verdict="defect")] == [4, 9]
        for item, entry_id in offered:
            if entry_id is None:
                continue
            entry = reader.get(entry_id)
            assert (entry.camera, entry.verdict, entry.seq) == ("cam0", item.verdict, item.frame.seq)
            stored = cv2.imread(str(reader.file(entry)), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(stored, item.frame.image), "the frame as received, lossless"
            if item.verdict == "ok":
                assert entry.overlay_file is None
                continue
            overlay = cv2.imread(str(reader.file(entry, "overlay")))
            assert overlay.shape == (FRAME, FRAME, 3)
            # Inside the mask the overlay is tinted red; well outside the boxes it is still the grey frame.
            inside = overlay[item.mask]
            assert (inside[:, 2].astype(int) - inside[:, 0].astype(int)).mean() > 40
            outside = ~cv2.dilate(item.mask.view(np.uint8), np.ones((5, 5), np.uint8)).view(bool)
            outside[:24] = False  # the score is written at the top
            away = overlay[outside].astype(int)
            assert np.abs(away - item.frame.image[outside][:, None]).mean() < 4, "the frame, up to JPEG's noise"
            assert abs((away[:, 2] - away[:, 0]).mean()) < 2, "not tinted"
        root = tmp_path / "archive"
        assert live_frame(root, "cam0") is not None and live_frame(root, "nope") is None
        assert live_frame(root, "../cam0") is None
        with pytest.raises(ArchiveError, match="not in the archive"):
            reader.get("cam0-20000101T000000000-1")
        with pytest.raises(ArchiveError, match="expected <camera>"):
            reader.get("../../etc/passwd")


def test_size_bound_deletes_the_oldest_frames_and_their_files(tmp_path):
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=0.1, max_age_h=24, good_every=0).start()
    ids = []
    for seq in range(60):
        noisy = np.random.default_rng(seq).integers(0, 256, (FRAME, FRAME)).astype(np.uint8)  # PNG cannot shrink it
        item = judged("cam0", seq, noisy)
        assert item.verdict == "defect"
        ids.append(archive.offer(item))
        time.sleep(0.002)  # keep the writer from falling behind: every frame must be written for the count below
    assert archive.close()
    status = archive.status()
    assert status["written"]["defect"] + status["lost"] == 60
    assert 0 < status["bytes"] <= 0.1 * 2**20 and status["pruned"] > 0
    with ArchiveReader(root) as reader:
        kept = [e.id for e in reader.query()]
        assert sum(e.bytes for e in reader.query()) == status["bytes"]
    assert kept == [i for i in ids if i in kept] and kept[-1] == ids[-1], "the newest kept, in order"
    assert ids[0] not in kept
    on_disk = sorted(p.name.split(".")[0] for p in root.glob("cam0/*/*.png"))
    assert on_disk == sorted(kept), "a deleted entry leaves no file behind"


def test_age_bound_deletes_frames_older_than_max_age(tmp_path, monkeypatch):
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=1, good_every=1).start()
    real_time = time.time
    archive.offer(judged("cam0", 0, good_frame(0)))
    archive.offer(judged("cam0", 1, good_frame(1)))
    assert archive.close()
    # Two hours later, a daemon on the same archive writes one more frame: the two old ones go.
    monkeypatch.setattr(archive_module.time, "time", lambda: real_time() + 7200)
    archive = Archive(root, max_mb=100, max_age_h=1, good_every=1).start()
    archive.offer(judged("cam0", 2, good_frame(2)))
    assert archive.close()
    monkeypatch.undo()
    with ArchiveReader(root) as reader:
        assert [e.seq for e in reader.query()] == [2]
    assert archive.status()["pruned"] == 2


class _WallClock:
    """The time module as the archive sees it, with a wall clock an operator (or NTP) can step."""

    def __init__(self, step: float = 0.0) -> None:
        self.step = step
        self.monotonic = time.monotonic

    def time(self) -> float:
        return time.time() + self.step


def noisy_defect(camera: str, seq: int) -> Judged:
    noisy = np.random.default_rng(seq).integers(0, 256, (FRAME, FRAME)).astype(np.uint8)  # PNG cannot shrink it
    item = judged(camera, seq, noisy)
    assert item.verdict == "defect"
    return item


def write_all(archive: Archive, items: list[Judged]) -> list[str]:
    ids = []
    for item in items:
        entry_id = archive.offer(item)
        assert entry_id is not None
        ids.append(entry_id)
        time.sleep(0.002)  # keep the writer from falling behind: every frame must be written
    return ids


def test_a_wall_clock_set_back_never_deletes_the_newest_frames_first(tmp_path, monkeypatch):
    root, cap = tmp_path / "archive", 0.05  # about 10 of these frames
    clock = _WallClock()
    monkeypatch.setattr(archive_module, "time", clock)
    archive = Archive(root, max_mb=cap, max_age_h=24, good_every=0).start()
    before = write_all(archive, [noisy_defect("cam0", seq) for seq in range(20)])
    clock.step = -3600.0  # NTP steps the clock back an hour, the archive at its size bound
    after = write_all(archive, [noisy_defect("cam0", seq) for seq in range(20, 23)])
    assert archive.close()
    assert archive.status()["lost"] == 0
    with ArchiveReader(root) as reader:
        kept = [e.id for e in reader.query()]
    assert set(after) <= set(kept), "a frame its result names was deleted as soon as it was written"
    assert sorted(kept) == sorted((before + after)[-len(kept) :]), "the oldest written went first"
    # The next run, with the clock an hour further back still: the order of writing holds across runs too.
    clock.step = -7200.0
    archive = Archive(root, max_mb=cap, max_age_h=24, good_every=0).start()
    again = write_all(archive, [noisy_defect("cam0", seq) for seq in range(23, 27)])
    assert archive.close()
    with ArchiveReader(root) as reader:
        kept = [e.id for e in reader.query()]
    assert sorted(kept) == sorted((before + after + again)[-len(kept) :]) and set(again) <= set(kept)


def test_a_step_of_the_wall_clock_is_not_an_age(tmp_path, monkeypatch):
    root = tmp_path / "archive"
    clock = _WallClock()
    monkeypatch.setattr(archive_module, "time", clock)
    monkeypatch.setattr(archive_module, "AGE_CHECK_S", 0.0)  # the age is checked at every write
    archive = Archive(root, max_mb=100, max_age_h=1, good_every=0).start()
    first = write_all(archive, [noisy_defect("cam0", seq) for seq in range(3)])
    # A dead battery clock corrected by NTP while the daemon runs: a year forward. The frames are seconds old.
    clock.step = 365 * 86400.0
    second = write_all(archive, [noisy_defect("cam0", seq) for seq in range(3, 5)])
    assert archive.close()
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == first + second
        assert all(abs(e.t_written - clock.time()) < 60 for e in reader.query()), "write times moved with the step"
    # The clock back where it was, between runs: the frames' write times lie a year ahead and count as now, so
    # they go an hour from now rather than in a year.
    clock.step = 0.0
    archive = Archive(root, max_mb=100, max_age_h=1, good_every=0).start()
    third = write_all(archive, [noisy_defect("cam0", 5)])
    assert archive.close()
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == first + second + third
        assert all(e.t_written <= time.time() for e in reader.query())
    clock.step = 7200.0  # two hours later
    archive = Archive(root, max_mb=100, max_age_h=1, good_every=0).start()
    last = write_all(archive, [noisy_defect("cam0", 6)])
    assert archive.close()
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == last


def test_a_failing_disk_degrades_to_an_alarm_and_recovers(tmp_path, monkeypatch):
    root = tmp_path / "archive"
    root.write_text("a file where the archive directory should be")  # every write fails, even as root
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=0).start()
    archive.offer(judged("cam0", 0, defect_frame(0)))
    deadline = time.monotonic() + 10
    while not archive.status()["degraded"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status = archive.status()
    assert status["lost"] == 1 and "Error" in status["error"]
    # While degraded, frames are not queued for a disk that fails: their results say "not archived".
    assert archive.offer(judged("cam0", 1, defect_frame(1))) is None
    root.unlink()
    monkeypatch.setattr(archive, "_retry_at", 0.0)  # the retry is due
    entry_id = archive.offer(judged("cam0", 2, defect_frame(2)))
    assert entry_id is not None
    assert archive.close()
    assert not archive.status()["degraded"] and archive.status()["written"]["defect"] == 1
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == [entry_id]


def test_the_reader_refuses_what_is_not_an_archive(tmp_path):
    with pytest.raises(ArchiveError, match="expected an inspectd image archive"):
        ArchiveReader(tmp_path)


def as_another_user(*args: str) -> list[str]:
    """`inspectd ARGS` as another user, nobody, in the group that owns what this process creates: the operator in
    group inspectd running `inspectd web`. As any other user, the command as it is."""
    return as_nobody([sys.executable, "-m", "inspectd", *args], group=os.getegid())


@pytest.fixture
def shared_dir():
    """A directory other users can reach (tmp_path's parents are this user's alone)."""
    base = Path(tempfile.mkdtemp(prefix="inspectd-test-archive-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)


def test_the_archive_is_readable_by_its_group_whatever_the_umask(shared_dir):
    root = shared_dir / "archive"
    umask = os.umask(0o077)  # the unit's UMask=0077
    try:
        archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
        ids = write_all(archive, [noisy_defect("cam0", 0), judged("cam0", 1, good_frame(1))])
        deadline = time.monotonic() + 10
        while sum(archive.status()["written"].values()) < 2 or not (root / "live" / "cam0.jpg").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        modes = {p.relative_to(shared_dir).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}
        modes["archive"] = stat.S_IMODE(root.stat().st_mode)
        dirs = {name for name in modes if (shared_dir / name).is_dir()}
        assert {name for name in modes if name.endswith(("-wal", "-shm"))} == {
            "archive/index.sqlite3-wal",
            "archive/index.sqlite3-shm",
        }
        assert len(dirs) == 4 and len(modes) - len(dirs) == 7, modes  # index, wal, shm, live, 2 frames, overlay
        assert {name: mode for name, mode in modes.items() if mode != (0o750 if name in dirs else 0o640)} == {}
        listed = subprocess.run(
            as_another_user("archive", "list", "--archive", str(root), "--json"), capture_output=True, text=True
        )
        assert listed.returncode == 0, listed.stderr
        assert sorted(e["id"] for e in json.loads(listed.stdout)) == sorted(ids), "read beside the running writer"
        assert archive.close()
    finally:
        os.umask(umask)
    # Stopped, the daemon leaves no -shm a reader without write access would have to create.
    assert not (root / "index.sqlite3-wal").exists() and not (root / "index.sqlite3-shm").exists()
    out = shared_dir / "export"
    exported = subprocess.run(
        as_another_user("archive", "export", str(out), "--archive", str(root)), capture_output=True, text=True
    )
    if os.geteuid() == 0:  # nobody may read the archive but not write into this user's folder
        assert exported.returncode == 2 and "Traceback" not in exported.stderr, exported.stderr
        assert exported.stderr.strip() == f"inspectd archive: export {out}: cannot write (Permission denied)"
    else:
        assert exported.returncode == 0, exported.stderr
        assert sorted(p.stem for p in out.glob("test/*/*.png")) == sorted(ids)


def test_the_web_view_says_the_archive_is_unreadable_rather_than_not_there(shared_dir):
    root = shared_dir / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=0).start()
    write_all(archive, [noisy_defect("cam0", 0)])
    assert archive.close()
    root.chmod(0o700 if os.geteuid() == 0 else 0o000)  # an archive this user may not read
    port = free_port()
    web = subprocess.Popen(
        as_another_user(
            "web", "--endpoint", "tcp://127.0.0.1:1", "--archive", str(root), "--listen", f"127.0.0.1:{port}"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, alarms = time.monotonic() + 30, []
        while not any("archive" in alarm for alarm in alarms):
            assert time.monotonic() < deadline, alarms
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=5) as reply:
                    alarms = json.load(reply)["alarms"]
            except OSError:
                continue
        (alarm,) = [a for a in alarms if "archive" in a]
        assert alarm == f"archive unreadable: {root / 'index.sqlite3'}: cannot read the archive (Permission denied)"
    finally:
        web.terminate()
        web.wait(10)
        root.chmod(0o750)


def inspectd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_export_to_a_folder_it_cannot_write_says_so_in_one_line(tmp_path):
    archive_dir = tmp_path / "archive"
    archive = Archive(archive_dir, max_mb=100, max_age_h=24, good_every=0).start()
    large = [np.random.default_rng(seq).integers(0, 256, (256, 256)).astype(np.uint8) for seq in range(3)]
    ids = write_all(archive, [judged("cam0", seq, image) for seq, image in enumerate(large)])  # 64 kB PNGs
    assert archive.close()
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file where a folder would go")
    out = blocker / "out"
    under_a_file = inspectd("archive", "export", str(out), "--archive", str(archive_dir))
    assert under_a_file.returncode == 2 and "Traceback" not in under_a_file.stderr, under_a_file.stderr
    assert under_a_file.stderr.strip() == f"inspectd archive: export {out}: cannot write (Not a directory)"

    # A disk that fills up: a file size limit fails the first frame's write as ENOSPC would, half written (and
    # leaves room for the index's 32 kB -shm file, which a reader may have to create).
    full = tmp_path / "full"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))

    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "archive", "export", str(full), "--archive", str(archive_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        preexec_fn=small_files,
    )
    frame = full / "test" / "defect" / f"{ids[0]}.png"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == f"inspectd archive: export {full}: cannot write {frame} (File too large)"
    assert not frame.exists(), "no truncated image left behind"


def test_daemon_archives_what_it_publishes_and_export_feeds_calibrate(tmp_path):
    bundle = write_grey_bundle(tmp_path / "bundle")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    s = Station(
        tmp_path,
        bundle,
        [{"id": "cam0", "source": {"kind": "folder", "path": str(inbox), "poll_ms": 20}}],
        archive={"good_every": 2},
    )
    try:
        s.wait_ready()
        planted = {3, 7}
        for i in range(10):
            drop(inbox, f"{i:03d}.png", defect_frame(i) if i in planted else good_frame(i))
        results = s.results(10, timeout=60)
        assert s.stop() == 0, s.log_tail()
    finally:
        s.close()
    assert len(results) == 10, s.log_tail()
    by_name = {r.frame_id: r for r in results}
    for i in range(10):
        r = by_name[f"{i:03d}.png"]
        assert r.verdict == ("defect" if i in planted else "ok")
    defects = [r for r in results if r.verdict == "defect"]
    assert all(r.archive_id for r in defects)
    goods = [r for r in results if r.verdict == "ok"]
    assert [bool(r.archive_id) for r in goods] == [True, False] * 4, "one good frame in two"

    archive_dir = tmp_path / "state" / "archive"
    listed = inspectd("archive", "list", "--archive", str(archive_dir), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted(row["id"] for row in rows) == sorted(r.archive_id for r in results if r.archive_id)
    human = inspectd("archive", "list", "--archive", str(archive_dir), "--verdict", "defect")
    assert human.returncode == 0 and len(human.stdout.splitlines()) == 2
    assert all(r.archive_id in human.stdout for r in defects)

    out = tmp_path / "export"
    exported = inspectd(
        "archive", "export", str(out), "--archive", str(archive_dir), "--verdict", "ok", "--since", "1h"
    )
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.stem for p in (out / "test" / "good").glob("*.png")) == sorted(
        r.archive_id for r in goods if r.archive_id
    )
    assert not (out / "test" / "defect").exists()
    calibrated = inspectd("calibrate", str(bundle), "--good", str(out), "--target-false-reject", "0.2", "--dry-run")
    assert calibrated.returncode == 0, calibrated.stdout + calibrated.stderr
    assert "4" in calibrated.stdout  # the four exported good frames were scored

    nothing = inspectd(
        "archive", "export", str(tmp_path / "none"), "--archive", str(archive_dir), "--until", "2000-01-01"
    )
    assert nothing.returncode == 1 and "no archived frame matched" in nothing.stderr
    missing = inspectd("archive", "list", "--archive", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "expected an inspectd image archive" in missing.stderr
    bad_time = inspectd("archive", "list", "--archive", str(archive_dir), "--since", "yesterday")
    assert bad_time.returncode == 2 and "--since: 'yesterday', expected an ISO time" in bad_time.stderr
    # A span that holds nothing by its own ends (a day mistyped) is refused, not answered with an empty list.
    backwards = inspectd("archive", "list", "--archive", str(archive_dir), "--since", "1h", "--until", "2h")
    assert backwards.returncode == 2 and backwards.stderr.strip().splitlines() == [
        "inspectd archive: --since 1h --until 2h: the span ends at or before it starts, expected --until after --since"
    ]
    ahead = inspectd(
        "archive", "export", str(tmp_path / "ahead"), "--archive", str(archive_dir), "--since", "2999-01-01"
    )
    assert ahead.returncode == 2 and "--since 2999-01-01: now or in the future" in ahead.stderr, ahead.stderr
    assert not (tmp_path / "ahead").exists()


def wait_until(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def done_count(archive: Archive) -> int:
    status = archive.status()
    return sum(status["written"].values()) + status["lost"]


def offer_grey(archive: Archive, seq: int) -> str | None:
    """Offer a 320x320 good frame (a 65 kB PNG) and wait until it is written or lost."""
    before = done_count(archive)
    image = (128 + np.random.default_rng(seq).integers(-12, 13, (320, 320))).astype(np.uint8)
    entry_id = archive.offer(judged("cam0", seq, image))
    wait_until(lambda: done_count(archive) > before, "the write")
    return entry_id


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int = 0) -> Path:
    """Something else takes the disk's free space, all but about `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while (room := free_bytes(disk) - leave) > 0:
                f.write(b"x" * min(room, 65536))
        except OSError as exc:
            assert "No space left" in str(exc), exc
    return filler


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 3 MB (tmpfs), unmounted after the test whatever happened."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        # Not an install step: a machine (a container without CAP_SYS_ADMIN) that lets no one mount.
        pytest.skip(f"this machine lets this user mount no tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)  # a writer still holding a file: detach it


def test_a_full_disk_makes_the_archive_delete_its_own_oldest_frames_not_stay_degraded(small_disk):
    root = small_disk / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()  # a budget far over the 3 MB disk
    ids = []
    for seq in range(80):  # about 65 kB each, 5 MB in all
        ids.append(offer_grey(archive, seq))
    status = archive.status()
    assert status["lost"] == 0 and status["written"]["ok"] == 80, status
    assert status["pruned"] > 0 and status["pruned"] + status["entries"] == 80
    # Bounded by the disk, not by its max_mb: written on, and said (an alarm from the first frame deleted for it).
    assert status["degraded"] and "its oldest frames are deleted to keep it" in status["error"], status
    with ArchiveReader(root) as reader:
        kept = [e.id for e in reader.query()]
    assert kept == ids[-len(kept) :], "the oldest written were deleted, the newest kept"
    assert sorted(p.name.split(".")[0] for p in root.glob("cam0/*/*.png")) == sorted(kept)
    # It leaves the file system its floor of free space: the journal beside it can still write.
    assert shutil.disk_usage(small_disk).free >= 0.01 * 3 * 2**20
    journal = small_disk / "journal-segment"
    with open(journal, "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        os.fsync(f.fileno())
    # Something else then takes every byte left: the archive makes room in what is its own, before each write.
    fill(small_disk)
    for seq in range(80, 83):
        ids.append(offer_grey(archive, seq))
    assert archive.close()
    status = archive.status()
    assert status["written"]["ok"] == 83 and status["lost"] == 0, status
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()][-1] == ids[-1]
    assert leftovers(root) == [], "a write the full disk failed (the live frame's) leaves no .tmp"


def test_free_space_others_took_under_the_floor_degrades_the_archive_and_deletes_none_of_it(small_disk, monkeypatch):
    root = small_disk / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    ids = write_all(archive, [judged("cam0", seq, good_frame(seq)) for seq in range(3)])  # a few kB in all
    wait_until(lambda: archive.status()["written"]["ok"] == 3, "the first frames")
    held = archive.status()["bytes"]
    floor = int(os.statvfs(small_disk).f_blocks * os.statvfs(small_disk).f_frsize * 0.01)
    # A log or a core dump leaves half the floor free: more than the whole archive could give back.
    filler = fill(small_disk, leave=floor // 2)
    assert floor - free_bytes(small_disk) > held
    with structlog.testing.capture_logs() as logs:
        for seq in range(3, 6):
            offer_grey(archive, seq)
    status = archive.status()
    assert status["degraded"] and status["lost"] == 3 and status["pruned"] == 0 and status["entries"] == 3, status
    assert "under the archive's floor" in status["error"], status
    assert "the room left is the journal's" in status["error"], status
    assert [e["event"] for e in logs if e["event"].startswith("archive_")] == ["archive_degraded"], logs
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == ids
        assert all(reader.frame_bytes(reader.get(entry_id)) for entry_id in ids), "every frame still there"
    # The filler goes: the next write (once the retry is due) finds room, and the alarm clears.
    filler.unlink()
    monkeypatch.setattr(archive, "_retry_at", 0.0)
    entry_id = offer_grey(archive, 6)
    assert archive.close()
    status = archive.status()
    assert not status["degraded"] and status["written"]["ok"] == 4 and status["pruned"] == 0, status
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == [*ids, entry_id]


def test_a_restart_on_a_full_disk_deletes_the_oldest_frames_to_write_the_new_one(small_disk, monkeypatch):
    root = small_disk / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    ids = [offer_grey(archive, seq) for seq in range(12)]  # about 0.8 MB
    assert archive.close()
    assert not (root / "index.sqlite3-wal").exists(), "closed, the index is back in rollback mode"
    # Something else fills the disk (the journal fails, the daemon restarts): the index cannot even be opened for
    # writing until the archive deletes some of its own.
    fill(small_disk)
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    entry_id = offer_grey(archive, 12)
    assert archive.close()
    status = archive.status()
    assert not status["degraded"] and status["written"]["ok"] == 1 and status["lost"] == 0, status
    assert status["pruned"] > 0 and status["entries"] == 13 - status["pruned"], status
    with ArchiveReader(root) as reader:
        kept = [e.id for e in reader.query()]
    assert kept == [*ids, entry_id][status["pruned"] :], "the oldest went, the new frame was written"
    assert sorted(p.name.split(".")[0] for p in root.glob("cam0/*/*.png")) == sorted(kept)


def test_failed_opens_of_the_index_leak_no_file_descriptor(small_disk, monkeypatch):
    root = small_disk / "archive"
    root.mkdir()
    with fmt.connect(root) as db:  # an index with no entry to delete, in rollback mode as a closed archive leaves it
        db.execute("PRAGMA journal_mode=DELETE").fetchall()
    db.close()
    fill(small_disk)
    monkeypatch.setattr(archive_module, "RETRY_S", 0.0)  # retried at every frame
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    gc.disable()  # a connection left open would only be closed by the cyclic collector
    try:
        offer_grey(archive, 0)
        assert archive.status()["degraded"], archive.status()
        before = open_fds()
        for seq in range(1, 31):
            offer_grey(archive, seq)
        assert archive.status()["lost"] == 31
        assert open_fds() <= before, "each failed open left its connection open"
    finally:
        gc.enable()
        archive.close()


def test_a_refused_reader_leaks_no_file_descriptor(tmp_path):
    # An index with no schema yet (the writer's empty file), which the web view retries while it stays so.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "index.sqlite3").write_bytes(b"")
    gc.disable()
    try:
        before = open_fds()
        for _ in range(30):
            with pytest.raises(ArchiveError, match="cannot read the archive index"):
                ArchiveReader(tmp_path / "new")
        assert open_fds() <= before, "each refused reader left its connection open"
    finally:
        gc.enable()


def test_the_age_bound_is_kept_with_nothing_written_and_emptied_day_folders_go(tmp_path, monkeypatch):
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=1, good_every=1).start()
    for seq in range(3):  # captured on three days: three day folders
        archive.offer(judged("cam0", seq, good_frame(seq), t=time.time() - seq * 86400))
    assert archive.close()
    assert len(list((root / "cam0").iterdir())) == 3
    # Two hours later the line stands still (or every write fails): the frames still expire, and their folders go.
    monkeypatch.setattr(archive_module, "time", _WallClock(step=7200.0))
    archive = Archive(root, max_mb=100, max_age_h=1, good_every=1).start()
    wait_until(lambda: archive.status()["pruned"] == 3, "the age bound with no frame offered")
    assert archive.close()
    with ArchiveReader(root) as reader:
        assert reader.query() == []
    assert list((root / "cam0").iterdir()) == []


def test_a_lowered_max_mb_is_kept_with_nothing_written(tmp_path):
    """An operator lowers archive.max_mb because the disk fills, and restarts while the line stands still (or keeps
    nothing: good_every 0, no defect): the size bound was kept only before a write, so the archive stayed over it,
    without an alarm. The writer's minute check keeps it as it keeps the age bound, the oldest frames first."""
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=0).start()
    ids = write_all(archive, [noisy_defect("cam0", seq) for seq in range(20)])
    assert archive.close()
    before = archive.status()["bytes"]
    lowered = before / 4 / 2**20
    archive = Archive(root, max_mb=lowered, max_age_h=24, good_every=0).start()
    try:
        wait_until(lambda: archive.status()["pruned"] > 0, "the size bound with no frame offered")
        status = archive.status()
        assert 0 < status["bytes"] <= lowered * 2**20 < before, status
    finally:
        assert archive.close()
    with ArchiveReader(root) as reader:
        kept = [e.id for e in reader.query()]
    assert kept == ids[-len(kept) :] and len(kept) == status["entries"], "the newest kept, the oldest deleted"
    assert sorted(p.name.split(".")[0] for p in root.glob("cam0/*/*.png")) == sorted(kept)


def test_what_a_kill_left_is_removed_at_open_and_nothing_else(tmp_path):
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    (kept,) = write_all(archive, [judged("cam0", 0, good_frame(0))])
    assert archive.close()
    (day,) = (root / "cam0").iterdir()
    # Renamed into place, killed before its index row was committed: kept all the same, as an image the index lacks
    # may be one a power cut or a moved-aside index lost the row of.
    orphan = "cam0-20260301T120000000-7"
    left = [day / f"{kept}.png.tmp", root / "live/cam0.jpg.tmp"]
    others = [day / f"{orphan}.png", day / f"{orphan}.overlay.jpg", day / "notes.txt", day / "cam0.png"]
    others += [day / f"{orphan}.png.bak", root / "cam0/README", root / "x.tmp"]
    for path in left + others:
        path.write_bytes(b"left")
    (root / "cam1/2026-03-01").mkdir(parents=True)  # a day folder left empty
    (root / "cam1/not-a-day").mkdir()
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()  # opened by its first age check
    wait_until(lambda: not any(path.exists() for path in left), "the leftovers removed")
    assert archive.close()
    assert [path for path in others if not path.exists()] == [], "only what the writer names is removed"
    assert (day / f"{kept}.png").exists() and not (root / "cam1/2026-03-01").exists()
    assert (root / "cam1/not-a-day").is_dir()
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == [kept]


def test_an_index_moved_aside_costs_no_image(tmp_path):
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    write_all(archive, [judged("cam0", seq, defect_frame(seq)) for seq in range(3)])
    assert archive.close()
    images = sorted(root.glob("cam0/*/*"))
    assert len(images) == 6  # three frames, three overlays
    for path in root.glob("index.sqlite3*"):  # an operator's answer to an `archive_degraded ... malformed`
        path.rename(path.with_name(path.name + ".malformed"))
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    (new,) = write_all(archive, [judged("cam0", 3, defect_frame(3))])
    assert archive.close()
    assert set(images) <= set(root.glob("cam0/*/*")), "the defect history went with its index"
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == [new]


def test_a_capture_time_that_is_no_date_still_files_the_frame_and_its_live_image(tmp_path):
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=0).start()
    before = time.time()
    # Milliseconds (a common producer's choice), a camera without a clock, and a date past 9999.
    captures = [before * 1000, 0.0, 1e13]
    ids = write_all(archive, [judged("cam0", seq, defect_frame(seq), t=t) for seq, t in enumerate(captures)])
    assert archive.close()
    after = time.time()
    status = archive.status()
    assert status["written"]["defect"] == 3 and status["lost"] == 0 and not status["degraded"], status
    days = {time.strftime("%Y-%m-%d", time.gmtime(t)) for t in (before, after)}
    with ArchiveReader(root) as reader:
        entries = reader.query()
        assert [e.id for e in entries] == ids
        # Filed under the time each was offered: found by a query for the last minutes, in today's folder.
        assert all(before - 1 <= e.t_capture <= after + 1 for e in entries)
        assert all(e.frame_file.split("/")[1] in days for e in entries)
        assert live_frame(root, "cam0") is not None

    # An offer that fails outright (a capture time that is no number): one alarm for the run, not a line per frame,
    # and the live frame still goes.
    root = tmp_path / "second"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=0).start()
    with structlog.testing.capture_logs() as logs:
        for seq in range(5):
            assert archive.offer(judged("cam0", seq, defect_frame(seq), t="1795435881.627")) is None  # type: ignore[arg-type]
        status = archive.status()
        assert status["degraded"] and status["lost"] == 5 and "TypeError" in status["error"], status
        wait_until(lambda: (root / "live/cam0.jpg").exists(), "the live frame")
        assert archive.offer(judged("cam0", 5, defect_frame(5))) is not None
        assert not archive.status()["degraded"]
    assert archive.close()
    events = [e for e in logs if str(e["event"]).startswith("archive_offer")]
    assert [e["event"] for e in events] == ["archive_offer_failed", "archive_offer_recovered"], events
    assert events[1]["failed"] == 5


def test_export_skips_a_frame_whose_file_is_empty_or_cut_short(tmp_path):
    archive_dir = tmp_path / "archive"
    archive = Archive(archive_dir, max_mb=100, max_age_h=24, good_every=1).start()
    ids = write_all(archive, [judged("cam0", seq, good_frame(seq)) for seq in range(3)])
    assert archive.close()
    with ArchiveReader(archive_dir) as reader:
        files = {e.id: reader.file(e) for e in reader.query()}
    files[ids[0]].write_bytes(b"")  # what a power cut before the data reached the disk leaves
    files[ids[1]].write_bytes(files[ids[1]].read_bytes()[:60])  # cut short
    out = tmp_path / "export"
    done = inspectd("archive", "export", str(out), "--archive", str(archive_dir), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["exported"] == 1 and report["unreadable"] == ids[:2], report
    assert done.stderr.strip() == (
        f"inspectd archive: skipped 2 frame(s) whose file is empty, not a whole PNG or a link loop: {ids[0]} {ids[1]}"
    )
    assert [p.stem for p in out.rglob("*.png")] == [ids[2]], "nothing unreadable copied into a training folder"
    rows = [json.loads(line) for line in (out / "archive.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [ids[2]]
    none_readable = inspectd("archive", "export", str(tmp_path / "bad"), "--archive", str(archive_dir), "--limit", "2")
    assert none_readable.returncode == 1 and "no archived frame could be read" in none_readable.stderr
    assert list((tmp_path / "bad").rglob("*.png")) == []


def test_an_export_whose_index_names_images_that_are_not_there_says_so_and_leaves_no_out(tmp_path):
    """An index restored or copied without its images (or an image folder not mounted): every frame was called
    "expired (deleted by retention)", and an OUT holding only an empty archive.jsonl was left behind, a folder that
    looks like an export."""
    archive_dir = tmp_path / "archive"
    archive = Archive(archive_dir, max_mb=100, max_age_h=24, good_every=1).start()
    ids = write_all(archive, [judged("cam0", seq, good_frame(seq)) for seq in range(3)])
    assert archive.close()
    shutil.rmtree(archive_dir / "cam0")
    out = tmp_path / "restored" / "export"
    done = inspectd("archive", "export", str(out), "--archive", str(archive_dir), "--camera", "cam0")
    assert done.returncode == 1, done.stderr
    assert "retention" not in done.stdout + done.stderr, (done.stdout, done.stderr)
    assert done.stdout.strip() == (
        f"exported 0 frame(s) to {out}/test/ (good: 0, defect: 0); 3 matched frame(s) have no image file though the "
        "index names them"
    )
    assert done.stderr.strip() == (
        "inspectd archive: no archived frame could be copied: 3 of the 3 that matched have no image file though the "
        "index names them (an index restored or copied without its images, or an image folder not mounted?)"
    )
    assert not (tmp_path / "restored").exists(), list(tmp_path.rglob("*"))
    as_json = inspectd("archive", "export", str(out), "--archive", str(archive_dir), "--json")
    report = json.loads(as_json.stdout)
    assert (report["out"], report["missing"], report["expired"]) == (None, ids, []), report
    # An OUT that was there before is left, as it was.
    out.mkdir(parents=True)
    assert inspectd("archive", "export", str(out), "--archive", str(archive_dir)).returncode == 1
    assert out.is_dir()


def manifest_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "archive.jsonl").read_text().splitlines()]


def test_an_export_into_a_folder_holding_an_earlier_exports_frames_is_refused_unless_added_to(tmp_path):
    """The recalibration recipe run twice into one folder: the second export is refused in one line, so calibrate
    never sets thresholds on last week's frames unasked. With --add it adds, saying what the folder now holds, and
    exporting the same span again changes nothing, not even the manifest. The same export retried into its own folder
    needs no --add; the other split of a folder is a folder of its own."""
    archive_dir = tmp_path / "archive"
    archive = Archive(archive_dir, max_mb=100, max_age_h=1000, good_every=1).start()
    now = time.time()
    last_week = write_all(archive, [judged("cam0", seq, good_frame(seq), now - 8 * 86400 + seq) for seq in range(10)])
    today = write_all(archive, [judged("cam0", seq, good_frame(seq), now - 600 + seq) for seq in range(10, 20)])
    assert archive.close()
    since = datetime.datetime.fromtimestamp(now - 3600).isoformat(timespec="seconds")
    out = tmp_path / "recal"
    common = ("--archive", str(archive_dir), "--verdict", "ok")

    def good_files() -> list[str]:
        return sorted(p.stem for p in (out / "test" / "good").iterdir())

    first = inspectd("archive", "export", str(out), *common, "--until", "2d")
    assert first.returncode == 0 and first.stdout.strip().endswith("(good: 10, defect: 0)"), first.stderr
    assert good_files() == last_week
    manifest = (out / "archive.jsonl").read_bytes()

    again = inspectd("archive", "export", str(out), *common, "--since", since)
    assert again.returncode == 2 and again.stdout == "", again.stdout
    assert again.stderr.strip() == (
        f"inspectd archive: export {out}: {out}/test/ already holds 10 frame(s) not of this export (an earlier "
        "export's, or copied in), which calibrate, train and teach would read too: export into a fresh folder, or "
        "--add to add to them"
    )
    assert good_files() == last_week and (out / "archive.jsonl").read_bytes() == manifest, "nothing written"

    added = inspectd("archive", "export", str(out), *common, "--since", since, "--add")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == (
        f"exported 10 frame(s) to {out}/test/ (good: 10, defect: 0); 0 of them were there already; {out}/test/ now "
        "holds 20 frame(s) (good: 20)"
    )
    assert good_files() == sorted(last_week + today)
    rows = manifest_rows(out)
    assert [row["id"] for row in rows] == last_week + today and len({row["export_run"] for row in rows}) == 2
    manifest = (out / "archive.jsonl").read_bytes()

    same_span = inspectd("archive", "export", str(out), *common, "--since", since, "--add", "--json")
    assert same_span.returncode == 0, same_span.stderr
    report = json.loads(same_span.stdout)
    assert (report["exported"], report["already_there"], report["holds"]) == (10, 10, {"good": 20}), report
    assert good_files() == sorted(last_week + today)
    assert (out / "archive.jsonl").read_bytes() == manifest, "no row written twice"

    retried = inspectd("archive", "export", str(out), *common, "--until", "2d")  # the first export, as it was
    assert retried.returncode == 2 and "already holds 10 frame(s) not of this export" in retried.stderr
    fresh = tmp_path / "fresh"
    for _ in range(2):
        done = inspectd("archive", "export", str(fresh), *common, "--since", since)
        assert done.returncode == 0, done.stderr
    assert [row["id"] for row in manifest_rows(fresh)] == today
    held = f"10 of them were there already; {fresh}/test/ now holds 10 frame(s) (good: 10)"
    assert done.stdout.strip().endswith(held), done.stdout

    train = inspectd("archive", "export", str(out), *common, "--since", since, "--split", "train")
    assert train.returncode == 0 and train.stdout.strip().endswith("(good: 10, defect: 0)"), train.stderr
    assert sorted(p.stem for p in (out / "train" / "good").iterdir()) == today


def test_an_export_after_one_cut_off_mid_row_keeps_every_row_of_its_own(tmp_path):
    """An export killed while it appended leaves the manifest's last row cut short: the next export into the folder
    starts its rows on a line of their own, so none of its frames is left unnamed (teach would leave it out)."""
    archive_dir = tmp_path / "archive"
    archive = Archive(archive_dir, max_mb=100, max_age_h=24, good_every=1).start()
    ids = write_all(archive, [judged(camera, seq, good_frame(seq)) for camera in ("cam0", "cam1") for seq in range(4)])
    assert archive.close()
    out = tmp_path / "export"
    with ArchiveReader(archive_dir) as reader:
        assert reader.export(reader.query(camera="cam0"), out, "train") == 4
        manifest = out / "archive.jsonl"
        manifest.write_bytes(manifest.read_bytes()[:-40])
        assert reader.export(reader.query(camera="cam1"), out, "train") == 4
    parsed = []
    for line in manifest.read_text().splitlines():
        try:
            parsed.append(json.loads(line)["id"])
        except ValueError:
            continue
    assert parsed == ids[:3] + ids[4:], parsed


def test_export_counts_what_it_copied_and_what_expired_during_the_copy(tmp_path, monkeypatch, capsys):
    """Retention deletes the oldest frames between the export's query and its copy (an export reaching back to
    archive.max_age_h): the summary counts the frames copied, by verdict, and the expired ones apart; when all of
    them expired, it does not say that nothing matched."""
    real_time = time.time

    def hours_on(hours: float) -> None:
        monkeypatch.setattr(archive_module.time, "time", lambda: real_time() + hours * 3600)

    def retention(root: Path, hours: float, seq: int) -> None:
        """A daemon `hours` from now keeping an hour's frames writes one: its writer's age check deletes the older."""
        hours_on(hours)
        archive = Archive(root, max_mb=100, max_age_h=1, good_every=1).start()
        assert archive.offer(judged("cam0", seq, good_frame(seq))) is not None
        assert archive.close()
        monkeypatch.undo()

    def three_old_and_two_written_two_hours_on(root: Path) -> tuple[list[str], list[str]]:
        archive = Archive(root, max_mb=100, max_age_h=1000, good_every=1).start()
        old = write_all(archive, [judged("cam0", seq, good_frame(seq)) for seq in range(3)])
        assert archive.close()
        hours_on(2)
        archive = Archive(root, max_mb=100, max_age_h=1000, good_every=1).start()
        kept = write_all(archive, [judged("cam0", 3, good_frame(3)), judged("cam0", 4, defect_frame(4))])
        assert archive.close()
        monkeypatch.undo()
        return old, kept

    parser = argparse.ArgumentParser()
    archive_cli.add_arguments(parser)
    for name, as_json in (("text", False), ("json", True)):
        root, out = tmp_path / f"archive-{name}", tmp_path / name
        old, kept = three_old_and_two_written_two_hours_on(root)
        args = parser.parse_args(["export", str(out), "--archive", str(root)] + ["--json"] * as_json)
        with ArchiveReader(root) as reader:
            entries = archive_cli._query(reader, args)
            assert [e.id for e in entries] == old + kept
            retention(root, 2, 5)
            assert archive_cli._export(reader, entries, args) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        if as_json:
            report = json.loads(captured.out)
            assert report["exported"] == 2 and report["copied"] == {"ok": 1, "defect": 1}, report
            assert report["matched"] == {"ok": 4, "defect": 1} and report["expired"] == old, report
        else:
            assert captured.out.strip() == (
                f"exported 2 frame(s) to {out}/test/ (good: 1, defect: 1); 3 matched frame(s) expired (deleted by "
                "retention) before they could be copied"
            )
        assert sorted(p.stem for p in out.rglob("*.png")) == kept
        assert [row["id"] for row in manifest_rows(out)] == kept

    # The last archive now holds the two frames written two hours on and the one retention's daemon wrote then.
    args = parser.parse_args(["export", str(tmp_path / "none"), "--archive", str(root)])
    with ArchiveReader(root) as reader:
        entries = archive_cli._query(reader, args)
        assert len(entries) == 3
        retention(root, 4, 6)
        assert archive_cli._export(reader, entries, args) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == (
        f"exported 0 frame(s) to {tmp_path / 'none'}/test/ (good: 0, defect: 0); 3 matched frame(s) expired (deleted "
        "by retention) before they could be copied"
    )
    assert captured.err.strip() == (
        "inspectd archive: no archived frame could be copied: 3 of the 3 that matched expired during the export "
        "(deleted by retention)"
    )


def test_frames_queued_as_shutdown_reaches_the_archive_get_a_grace_of_their_own(tmp_path):
    bundle = write_grey_bundle(tmp_path / "bundle")
    config = in_process_config(tmp_path, bundle, {"kind": "synthetic", "rate_hz": 50, "width": 64, "height": 64})
    daemon = Daemon(dataclasses.replace(config, shutdown_timeout_s=0.05))  # spent before the archive closes
    daemon.start()
    archive = daemon.archive
    assert archive is not None
    large = []
    # About 20 ms each to encode and write (0.3 s in all on a 2-core box, load 1): several times the 0.1 s a grace
    # spent with the shutdown deadline would leave, and well within CLOSE_GRACE_S under a loaded suite.
    for seq in range(16):
        image = (128 + np.random.default_rng(seq).integers(-12, 13, (800, 800))).astype(np.uint8)
        image[100:164, 100:164] = 250
        large.append(judged("cam9", seq, image))
    queued: list[str | None] = []
    timeouts: list[float] = []
    close = archive.close

    def queue_then_close(timeout: float) -> bool:
        # The last results published named these frames, queued as shutdown reaches the archive.
        queued.extend(archive.offer(item) for item in large)
        timeouts.append(timeout)
        return close(timeout)

    archive.close = queue_then_close  # type: ignore[method-assign]
    try:
        wait_until(lambda: daemon.publisher.published >= 1, "a result", 20)
    finally:
        daemon.shutdown()
    assert len(queued) == 16 and None not in queued
    with ArchiveReader(archive.root) as reader:
        written = {e.id for e in reader.query(camera="cam9")}
    assert set(queued) <= written, f"{len(written)} of the {len(queued)} frames results name were written"
    assert timeouts[0] >= archive_module.CLOSE_GRACE_S


def test_a_limit_or_camera_that_cannot_select_is_refused_and_a_camera_not_archived_names_those_that_are(
    tmp_path, capsys
):
    """A --limit above what SQLite takes, or a --camera no camera can have, is refused in one line (exit 2); a camera
    the index holds no frame of gets the cameras it does hold named, so a typo does not read as an empty archive; an
    export that matched nothing leaves no OUT behind."""
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    ids = write_all(archive, [judged(camera, 0, good_frame(0)) for camera in ("cam1", "cam0")])
    assert archive.close()
    parser = argparse.ArgumentParser()
    archive_cli.add_arguments(parser)

    def cli(*argv: str) -> tuple[int, list[str]]:
        code = archive_cli.run(parser.parse_args([*argv, "--archive", str(root)]))
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return code, captured.err.splitlines()

    out = tmp_path / "out"
    huge = str(2**63)
    for argv in (["list"], ["export", str(out)]):
        assert cli(*argv, "--limit", huge) == (
            2,
            [f"inspectd archive: --limit: {huge}, expected a positive number of frames (at most {2**63 - 1})"],
        )
    assert cli("list", "--limit", str(2**63 - 1), "--json")[0] == 0, "the largest SQLite takes is a bound"
    expected = f"expected a camera id ({fmt.CAMERA_RE.pattern}, at most {fmt.MAX_CAMERA_ID} characters: it begins"
    for camera in ("../x", "cam0 ", "x" * 65):
        assert cli("list", "--camera", camera) == (
            2,
            [f"inspectd archive: --camera: {expected} file names), got {show(camera)}"],
        )
    assert cli("export", str(out), "--camera", "live") == (
        2,
        [
            "inspectd archive: --camera: 'live' is reserved (the image archive's live-frame folder), expected another "
            "camera id"
        ],
    )
    holds = "inspectd archive: no frame of camera cam9 in the archive, which holds cam0, cam1"
    assert cli("list", "--camera", "cam9") == (0, ["0 frame(s)", holds])
    assert cli("export", str(out), "--camera", "cam9") == (1, ["inspectd archive: no archived frame matched", holds])
    assert not out.exists(), "an export that matched nothing leaves no folder that looks like an export"
    for extra, said in (([], ""), (["--json"], None)):
        archive_cli.run(parser.parse_args(["export", str(out), "--camera", "cam9", *extra, "--archive", str(root)]))
        printed = capsys.readouterr().out
        # No line names a folder that was not made: the exported line for text, "out": null for JSON.
        assert (printed if said is not None else json.loads(printed)["out"]) == said, printed
    assert cli("list", "--camera", "cam0", "--until", "2000-01-01") == (0, ["0 frame(s)"]), "cam0 is archived"

    # Added to, a folder keeps what it held when the export matched nothing.
    assert cli("export", str(out), "--camera", "cam0")[0] == 0
    manifest = (out / "archive.jsonl").read_bytes()
    assert cli("export", str(out), "--add", "--camera", "cam9") == (
        1,
        ["inspectd archive: no archived frame matched", holds],
    )
    assert (out / "archive.jsonl").read_bytes() == manifest
    assert sorted(p.stem for p in out.rglob("*.png")) == [ids[1]]

    empty = tmp_path / "empty"
    empty.mkdir()
    fmt.connect(empty).close()  # an index the daemon created and has written nothing into yet
    assert archive_cli.run(parser.parse_args(["list", "--camera", "cam0", "--archive", str(empty)])) == 0
    assert capsys.readouterr().err.splitlines() == [
        "0 frame(s)",
        "inspectd archive: no frame of camera cam0 in the archive, which holds none yet",
    ]


def test_a_live_folder_this_user_cannot_enter_is_an_archive_error_naming_it(shared_dir):
    """Path.is_file() raises what is not "not there" (EACCES: a live/ folder restored under umask 077): the web view
    asks for every live frame once a second, so it must get the archive's own one-line error, not an OSError."""
    root = shared_dir / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    write_all(archive, [judged("cam0", 0, good_frame(0))])
    wait_until(lambda: live_frame(root, "cam0"), "the live frame")
    assert archive.close()
    live = root / "live"
    live.chmod(0o700 if os.geteuid() == 0 else 0o000)
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from inspectd.protocol.archive import ArchiveError, live_frame\n"
        "try:\n"
        "    print('found', live_frame(Path(sys.argv[1]), 'cam0'))\n"
        "except ArchiveError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    try:
        looked = subprocess.run(
            as_nobody([sys.executable, "-c", probe, str(root)], group=os.getegid()),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    finally:
        live.chmod(0o750)
    assert looked.returncode == 0 and looked.stderr == "", looked.stderr
    assert looked.stdout.strip() == f"ArchiveError {live / 'cam0.jpg'}: cannot read the live frame (Permission denied)"


def test_the_index_write_ahead_log_stays_about_a_mebibyte_however_many_rows_are_written(tmp_path):
    """archive.max_mb counts the images; the index's write-ahead log beside them grew to SQLite's default
    checkpoint (1000 pages, about 4 MiB) and was never truncated, uncounted, on a small archive as large as its
    images. Checkpointed every 256 pages and truncated to 1 MiB, it stays about that."""
    db = fmt.connect(tmp_path)
    try:
        row = {name: 0 for name in fmt.FIELDS}
        insert = f"INSERT INTO frames ({', '.join(fmt.FIELDS)}) VALUES ({', '.join('?' * len(fmt.FIELDS))})"
        for i in range(1200):
            values = {**row, "id": f"cam0-{i:08d}", "camera": "cam0", "frame_id": f"f{i}" * 20, "verdict": "defect"}
            values.update(frame_file=f"cam0/2026-12-07/{i}.png" * 3, t_written=float(i))
            with db:
                db.execute(insert, [values[name] for name in fmt.FIELDS])
        wal = tmp_path / (fmt.INDEX_NAME + "-wal")
        assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 1200
        assert wal.stat().st_size <= 1.5 * 2**20, wal.stat().st_size
    finally:
        db.close()
