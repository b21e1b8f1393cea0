"""The image archive's writer keeps its index, its files and its totals true: an entry that cannot be written for a
reason of its own (an image JPEG cannot hold, a frame larger than the whole archive, an id already indexed) costs that
frame alone, and an index deleted or replaced under the running writer is opened anew. Real files, a real SQLite
index, the writer's own thread; the config's reservation of the live-frame folder's name."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

from inspectd.daemon import archive as archive_module
from inspectd.daemon.archive import Archive
from inspectd.daemon.config import parse_config
from inspectd.errors import ConfigError
from inspectd.protocol.archive import INDEX_NAME, ArchiveReader, UnreadableFrame, live_frame
from station_model import defect_frame, good_frame, judged
from test_archive import inspectd, wait_until, write_all

pytestmark = pytest.mark.timeout(120)


def done_count(archive: Archive) -> int:
    status = archive.status()
    return sum(status["written"].values()) + status["lost"]


def offer_and_wait(archive: Archive, item) -> str | None:
    """Offer `item` and wait until the writer has written or lost it."""
    before = done_count(archive)
    entry_id = archive.offer(item)
    assert entry_id is not None
    wait_until(lambda: done_count(archive) > before, "the write")
    return entry_id


def index_totals(root: Path) -> tuple[int, int]:
    with ArchiveReader(root) as reader:
        entries = reader.query()
    return len(entries), sum(e.bytes for e in entries)


def noisy(seed: int) -> np.ndarray:
    """A 64 px frame PNG cannot shrink (about 8 kB), judged a defect."""
    return np.random.default_rng(seed).integers(0, 256, (64, 64)).astype(np.uint8)


def line_scan_defect(seq: int) -> np.ndarray:
    """A line-scan camera's frame, 70000 px long: taller than a JPEG may be (65500 px a side), a defect in it."""
    image = np.full((70000, 64), 128, np.uint8)
    image[100:110, 10:20] = 255
    return image


def test_a_frame_longer_than_jpeg_holds_is_archived_and_shown_shrunk_and_costs_no_other_camera(tmp_path):
    """Its overlay could not be encoded, and that was taken for a failing disk: the archive went degraded and every
    camera's frames were dropped for the retry's 5 s; its defects and its live frame never reached the disk."""
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=50, max_age_h=1, good_every=0).start()
    try:
        scan = offer_and_wait(archive, judged("scan0", 1, line_scan_defect(1)))
        others = [offer_and_wait(archive, judged("cam1", seq, defect_frame(seq))) for seq in range(3)]
        status = archive.status()
        assert not status["degraded"] and status["lost"] == 0 and status["written"]["defect"] == 4, status
    finally:
        assert archive.close()
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == [scan, *others]
        entry = reader.get(scan)
        frame = cv2.imread(str(reader.file(entry)), cv2.IMREAD_UNCHANGED)
        assert frame.shape == (70000, 64), "the frame itself as received"
        overlay = cv2.imread(str(reader.file(entry, "overlay")))
    assert overlay.shape[:2] == (65500, 60), "shrunk to JPEG's longest side, its aspect kept"
    live = live_frame(root, "scan0")
    assert live is not None
    assert cv2.imread(str(live)).shape[:2] == (65500, 60)


def test_an_image_no_encoder_takes_is_that_entrys_failure_not_the_disks(tmp_path, monkeypatch):
    """As if shrinking were not there: the overlay's encoder refuses the image. That frame is lost and logged, the
    archive is not degraded, and the next camera's frames are written."""
    monkeypatch.setattr(archive_module, "JPEG_MAX_SIDE", 10**9, raising=False)
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=50, max_age_h=1, good_every=0).start()
    try:
        with structlog.testing.capture_logs() as logs:
            offer_and_wait(archive, judged("scan0", 1, line_scan_defect(1)))
            other = offer_and_wait(archive, judged("cam1", 0, defect_frame(0)))
        status = archive.status()
        assert not status["degraded"] and status["lost"] == 1 and status["written"]["defect"] == 1, status
    finally:
        assert archive.close()
    failed = [e for e in logs if e["event"] == "archive_entry_failed"]
    assert [e["camera"] for e in failed] == ["scan0"] and "cannot encode a .jpg image" in failed[0]["error"], logs
    assert not [e for e in logs if e["event"] == "archive_degraded"], logs
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == [other]
    assert list(root.rglob("scan0-*")) == [], "no image of the failed entry left behind"


def test_an_id_written_again_is_refused_and_the_totals_stay_the_indexs(tmp_path):
    """A recording replayed with the journal off: the same camera, capture times and seqs again. INSERT OR REPLACE
    kept one row but counted both, and retention then deleted other cameras' frames to get under a size the archive
    was not at."""
    root = tmp_path / "archive"
    t0 = time.time() - 100
    # 6 frames of another camera, then cam0's 5 frames 4 times: all but the repeats (about 91 kB) fit 0.1 MiB.
    archive = Archive(root, max_mb=0.1, max_age_h=24, good_every=0).start()
    try:
        others = write_all(archive, [judged("camB", s, noisy(100 + s), t=t0 + s) for s in range(6)])
        firsts: list[str | None] = []
        for loop in range(4):  # each replay another take of the same frames
            replay = [judged("cam0", s, noisy(s) if loop == 0 else 255 - noisy(s), t=t0 + 50 + s) for s in range(5)]
            ids = [offer_and_wait(archive, item) for item in replay]
            firsts = firsts or ids
            assert ids == firsts
        status = archive.status()
    finally:
        assert archive.close()
    assert (status["entries"], status["bytes"]) == index_totals(root), status
    assert status["pruned"] == 0 and status["lost"] == 15, status
    # A replay's every frame refused is the setup's fault (ids that repeat), said as the alarm.
    assert status["degraded"] and "already names an earlier frame" in status["error"], status
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == others + firsts
        first = reader.get(firsts[0])
        stored = cv2.imread(str(reader.file(first)), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(stored, noisy(0)), "the id still names the frame first written"


def test_a_frame_larger_than_the_whole_archive_is_refused_and_the_history_kept(tmp_path):
    """Making room for it deleted every frame the archive held, and it was the next to go."""
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=0.02, max_age_h=24, good_every=0).start()  # 20 kB: a few 64 px defects
    try:
        kept = [offer_and_wait(archive, judged("cam0", s, defect_frame(s))) for s in range(3)]
        huge = np.random.default_rng(7).integers(0, 256, (200, 200)).astype(np.uint8)  # 40 kB as a PNG
        with structlog.testing.capture_logs() as logs:
            offer_and_wait(archive, judged("cam1", 0, huge))
        after = offer_and_wait(archive, judged("cam0", 3, defect_frame(3)))
        status = archive.status()
    finally:
        assert archive.close()
    assert status["pruned"] == 0 and status["lost"] == 1 and not status["degraded"], status
    assert (status["entries"], status["bytes"]) == index_totals(root)
    with ArchiveReader(root) as reader:
        assert [e.id for e in reader.query()] == [*kept, after]
    (failed,) = [e for e in logs if e["event"] == "archive_entry_failed"]
    assert "more than archive.max_mb" in failed["error"], failed
    assert live_frame(root, "cam1") is not None, "its live frame still shown"


def test_entries_that_fail_one_after_another_are_the_degraded_alarm_until_one_is_written(tmp_path, monkeypatch):
    """A max_mb smaller than every frame of a camera archived nothing, with one error line per frame and no alarm: a
    fault of the setup, not of one frame."""
    monkeypatch.setattr(archive_module, "ENTRY_FAILED_LOG_S", 3600.0)
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=0.02, max_age_h=24, good_every=0).start()
    huge = np.random.default_rng(7).integers(0, 256, (200, 200)).astype(np.uint8)  # 40 kB as a PNG
    try:
        with structlog.testing.capture_logs() as logs:
            for seq in range(6):
                offer_and_wait(archive, judged("cam1", seq, huge))
                if seq == 1:
                    assert not archive.status()["degraded"], "two in a row may be two odd frames"
            failing = archive.status()
            offer_and_wait(archive, judged("cam0", 0, defect_frame(0)))
            recovered = archive.status()
    finally:
        assert archive.close()
    assert failing["degraded"] and failing["lost"] == 6, failing
    assert failing["error"].startswith("3 entries in a row not written, the last: EntryRefused: the frame and its")
    assert not recovered["degraded"] and recovered["written"]["defect"] == 1, recovered
    told = [e["failed_in_a_row"] for e in logs if e["event"] == "archive_entry_failed"]
    assert told == [1, 2, 3], told  # past the alarm, at most one line a minute (an hour here)
    assert [e["failed"] for e in logs if e["event"] == "archive_entries_recovered"] == [6]


def test_an_archive_cleared_or_restored_under_the_running_writer_is_opened_anew(tmp_path):
    """The writer kept adding rows to the deleted index: no reader saw them, and after a restart their images were in
    no index, which no retention rule deletes."""
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=0).start()
    try:
        before = [offer_and_wait(archive, judged("cam0", s, defect_frame(s))) for s in range(2)]
        backup = tmp_path / "backup"
        shutil.copytree(root, backup)
        for path in root.iterdir():  # the operator clears it
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        cleared = [offer_and_wait(archive, judged("cam0", s, defect_frame(s))) for s in range(2, 4)]
        with ArchiveReader(root) as reader:
            assert [e.id for e in reader.query()] == cleared
        status = archive.status()
        assert (status["entries"], status["bytes"]) == index_totals(root) and not status["degraded"], status

        # Restored from the backup, with what a kill left in it: read anew, its totals counted, swept as at open.
        shutil.rmtree(root)
        (day,) = (backup / "cam0").iterdir()
        left = day / f"{before[0]}.png.tmp"
        left.write_bytes(b"left by a kill")
        shutil.copytree(backup, root, ignore=shutil.ignore_patterns("*-shm"))
        after = offer_and_wait(archive, judged("cam0", 9, defect_frame(9)))
        with ArchiveReader(root) as reader:
            assert [e.id for e in reader.query()] == [*before, after]
        status = archive.status()
        assert (status["entries"], status["bytes"]) == index_totals(root) and not status["degraded"], status
        assert not (root / left.relative_to(backup)).exists(), "the restored archive swept as at open"
    finally:
        assert archive.close()
    assert (root / INDEX_NAME).is_file()


def test_live_is_no_camera_id_the_config_takes(tmp_path):
    """`live` is the archive's live-frame folder: a camera of that id filed its entries there, beyond the sweep."""
    from test_config import with_value

    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["cameras", 0, "id"], "live"))
    assert str(refused.value) == (
        "cameras[0].id: 'live' is reserved (the image archive's live-frame folder), expected another camera id"
    )
    assert parse_config(with_value(["cameras", 0, "id"], "live0")).cameras[0].id == "live0"


def test_a_line_scan_overlay_frames_its_defect_without_covering_it():
    from inspectd.daemon.archive import BOX_COLOUR, overlay
    from inspectd.daemon.inference import Region

    image = np.full((20000, 64), 128, np.uint8)
    item = dataclasses.replace(judged("scan0", 0, image), regions=[Region(20, 10000, 24, 24, 576, 1.0)], mask=None)
    drawn = overlay(item)
    assert tuple(drawn[10000, 20]) == BOX_COLOUR  # the box's edge
    assert tuple(drawn[10012, 32]) != BOX_COLOUR  # its inside shows the frame


def test_a_frame_whose_path_is_a_symlink_loop_is_skipped_and_named_by_export(tmp_path):
    """A loop resolving a frame's path (someone with write access to the archive made it) is that frame's failure:
    export skips it and names it as it does a frame cut short, and copies the others."""
    root = tmp_path / "archive"
    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1).start()
    ids = write_all(archive, [judged("cam0", seq, good_frame(seq)) for seq in range(2)])
    assert archive.close()
    with ArchiveReader(root) as reader:
        first, second = reader.query()
        looped = reader.file(first)
        looped.unlink()
        looped.symlink_to(looped.name)
        with pytest.raises(UnreadableFrame) as refused:
            reader.file(first)
        assert str(refused.value) == (
            f"archive id {ids[0]!r}: frame file {root / first.frame_file} cannot be resolved (a symlink loop)"
        )
        assert reader.file(second).is_file()
    out = tmp_path / "out"
    done = inspectd("archive", "export", str(out), "--archive", str(root), "--json")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["unreadable"] == [ids[0]]
    assert (
        done.stderr.strip()
        == f"inspectd archive: skipped 1 frame(s) whose file is empty, not a whole PNG or a link loop: {ids[0]}"
    )
    assert [p.stem for p in out.rglob("*.png")] == [ids[1]]
