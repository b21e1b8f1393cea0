"""The journal writer's open on what an earlier run or a damaged disk left: an unclean stop's marks and newest segment
made durable (traced with strace) before a clean mark can cover them, marks holding damage (a flipped bit, a value
with no room left) ignored with a warning naming the file, numbering past 12 digits still listed, an undecodable
boot mark taken as an unknown boot, and a file refused at open named in the one-line error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.daemon.journal import BOOT_ID, RESERVE, Journal
from inspectd.protocol import journal as journal_format
from inspectd.protocol.journal import JournalError, read_since
from test_journal import result

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]

KILLED = """
import os, sys
from inspectd.daemon.journal import Journal
sys.path.insert(0, "tests")
from test_journal import result
j = Journal(sys.argv[1], max_bytes=1 << 20, fsync_interval_s=600)  # no sync round within this run's life
for seq in range(20):
    j.mark_accepted("cam0", seq)
    j.append("cam0", seq, result("cam0", seq))
os._exit(9)  # killed: nothing closes it
"""

RESTARTED = """
import sys
from inspectd.daemon.journal import Journal
j = Journal(sys.argv[1], max_bytes=1 << 20)
print(j.unclean, j.resume("cam0")[0], flush=True)
j.close()  # stopped again at once, cleanly (systemctl stop)
"""


def test_after_a_kill_a_clean_stop_makes_what_the_killed_run_left_durable_before_its_clean_mark(tmp_path):
    """The killed run's accepted mark and records are in the page cache only; a run that starts and stops cleanly
    writes the clean mark. Had it not fsynced them first, a power cut would leave a clean journal with stale marks,
    and the next start would give out seqs already published."""
    path = tmp_path / "j"
    killed = subprocess.run([sys.executable, "-c", KILLED, str(path)], cwd=REPO, capture_output=True, timeout=30)
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    trace = tmp_path / "trace"
    restarted = subprocess.run(
        ["strace", "-f", "-y", "-o", str(trace), "-e", "trace=openat,fsync,fdatasync"]
        + [sys.executable, "-c", RESTARTED, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert restarted.stdout.split()[-2:] == ["True", "20"]
    synced: list[str] = []
    for line in trace.read_text().splitlines():
        if re.search(r'openat\(.*"[^"]*/j/clean", [^)]*O_CREAT', line):
            break
        if found := re.search(r"f(?:data)?sync\(\d+<([^>]+)>\)", line):
            synced.append(Path(found.group(1)).relative_to(path).as_posix())
    else:
        raise AssertionError("no clean mark written")
    (segment,) = (path / "cam0").glob("*.seg")
    for owed in ("cam0/accepted", "cam0/reserved", f"cam0/{segment.name}", "cam0"):
        assert owed in synced, f"{owed} not fsynced before the clean mark: {synced}"


def flipped(tmp_path: Path, value: int) -> Path:
    """A journal of cam0's seqs 0-4, stopped cleanly, whose accepted mark then holds `value` (damage on disk)."""
    path = tmp_path / "j"
    j = Journal(path, max_bytes=1 << 20)
    for seq in range(5):
        j.mark_accepted("cam0", seq)
        j.append("cam0", seq, result("cam0", seq))
    j.close()
    (path / "cam0" / journal_format.ACCEPTED_MARK).write_bytes(journal_format.ACCEPTED.pack(value))
    return path


@pytest.mark.parametrize("value", [4 | 1 << 40, (1 << 63) - 1], ids=["bit-40-flipped", "no-room-left"])
def test_a_damaged_accepted_mark_is_ignored_with_a_warning_naming_it(tmp_path, capsys, value):
    """Trusted, bit 40 moved numbering to 13-digit segment names no reader listed, and 2**63-1 made every frame's
    mark fail (the reservation past it does not fit the mark). Ignored, numbering resumes past the journal and the
    reservation (what was in flight at a kill is unknown without the mark), and marks are written again."""
    path = flipped(tmp_path, value)
    j = Journal(path, max_bytes=1 << 20)
    out = capsys.readouterr().out
    assert "journal_mark_ignored" in out and f"{path}/cam0/accepted" in out, out
    seq, _ = j.resume("cam0")
    assert seq == RESERVE + 1  # the first frame (seq 0) reserved through 256
    j.mark_accepted("cam0", seq)
    j.append("cam0", seq, result("cam0", seq))
    j.close()
    assert journal_format.read_mark(path / "cam0", journal_format.ACCEPTED_MARK) == seq
    assert [s for s, _ in read_since(path, "cam0", 3)] == [4, seq]
    assert "journal_accepted_mark_failed" not in capsys.readouterr().out


def test_a_numbering_past_twelve_digits_is_listed_read_and_resumed(tmp_path):
    """Segments named by a first seq of 13 digits and more (a numbering moved there by a mark that was trusted):
    readers list them and the writer counts them at its next open (they were write-only and never trimmed)."""
    path = tmp_path / "j"
    high = (1 << 40) + 5
    j = Journal(path, max_bytes=1 << 20)
    for seq in range(high, high + 3):
        j.mark_accepted("cam0", seq)
        j.append("cam0", seq, result("cam0", seq))
    j.close()
    assert [p.name for _, p in journal_format.segment_files(path / "cam0")] == [f"{high}.seg"]
    assert [s for s, _ in read_since(path, "cam0", -1)] == [high, high + 1, high + 2]
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.last_seq("cam0") == high + 2 and reopened.resume("cam0")[0] == high + 3
    assert reopened.status()["bytes"] == (path / "cam0" / f"{high}.seg").stat().st_size
    reopened.close()


def test_a_boot_mark_that_is_not_text_is_an_unknown_boot_not_a_refusal(tmp_path):
    """After an unclean stop that is the safe side: numbering resumes past the reservation, as after a reboot, and
    the boot mark is written anew."""
    path = flipped(tmp_path, 4)
    (path / journal_format.CLEAN_MARK).unlink()  # as a kill leaves it
    (path / journal_format.BOOT_MARK).write_bytes(b"\xff\xfe\x00garbage\x80")
    j = Journal(path, max_bytes=1 << 20)
    assert j.unclean and j.rebooted and j.resume("cam0")[0] == RESERVE + 1
    j.close()
    assert (path / journal_format.BOOT_MARK).read_text().strip() == BOOT_ID.read_text().strip()


def test_a_file_refused_at_open_is_named_in_the_one_line_error(tmp_path):
    path = flipped(tmp_path, 4)
    mark = path / "cam0" / journal_format.ACCEPTED_MARK
    mark.unlink()
    mark.mkdir()
    with pytest.raises(JournalError, match=r"^publish.journal.path \S+/j: cannot use cam0/accepted \(Is a directory\)"):
        Journal(path, max_bytes=1 << 20)


def test_a_reservation_that_cannot_be_made_does_not_cost_the_accepted_mark(tmp_path, capsys):
    """The reserved mark cannot be opened (here a folder in its place; a full disk at a camera's first frame alike):
    the frames still get their seqs, and the accepted mark, which a SIGKILL cannot undo, still records them."""
    path = tmp_path / "j"
    j = Journal(path, max_bytes=1 << 20)
    (path / "cam0" / journal_format.RESERVED_MARK).mkdir(parents=True)
    for seq in range(10):
        j.mark_accepted("cam0", seq)
    assert "journal_accepted_mark_failed" in capsys.readouterr().out
    assert journal_format.read_mark(path / "cam0", journal_format.ACCEPTED_MARK) == 9
    j.close()


def test_a_clean_stop_whose_last_fsync_fails_withholds_the_clean_mark(tmp_path, monkeypatch, capsys):
    """close() fsyncs this run's marks and segments, then writes the clean mark. Where that fsync fails (EIO from the
    disk, put in at the os.fsync call for the files under cam0), the marks may not be on disk: a clean mark over them
    would let the next start after a power cut trust stale marks and give out seqs again."""
    import errno
    import os

    path = tmp_path / "j"
    j = Journal(path, max_bytes=1 << 20, fsync_interval_s=600)  # no sync round before close
    for seq in range(5):
        j.mark_accepted("cam0", seq)
        j.append("cam0", seq, result("cam0", seq))
    real = os.fsync

    def failing(fd: int) -> None:
        if "/cam0/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    j.close()
    monkeypatch.undo()
    assert j.fsync_failed >= 1
    assert not (path / journal_format.CLEAN_MARK).exists()
    assert "journal_clean_mark_withheld" in capsys.readouterr().out
    again = Journal(path, max_bytes=1 << 20)
    assert again.unclean  # the next start handles it as the unclean stop it may be
    again.close()


def test_the_plc_bridge_reads_a_damaged_reserved_mark_as_none_as_the_daemon_ignores_it(tmp_path):
    """Read as it was on disk, a flipped bit in the reservation would have passed any resume point (or, below -1,
    latched a false numbering restart) while the daemon ignored the same mark."""
    from inspectd.clients.bridge import _journal_reserved
    from inspectd.protocol.journal import ACCEPTED, RESERVED_MARK

    folder = tmp_path / "journal" / "cam0"
    folder.mkdir(parents=True)
    for value, read in ((300, 300), (-5, None), (2**62 + 1, None), (2**32 + 10, 2**32 + 10)):
        (folder / RESERVED_MARK).write_bytes(ACCEPTED.pack(value))
        assert _journal_reserved(tmp_path / "journal", "cam0") == read, value


def flip_header_seq(segment: Path, record: int, bit: int) -> None:
    """Flip one bit of the header seq of record `record` (from 0) of `segment`: outside the CRC, which covers the
    body alone."""
    ends = [0] + [end for end, _, _ in journal_format.read_records(segment)]
    data = bytearray(segment.read_bytes())
    data[ends[record] + 8 + bit // 8] ^= 1 << bit % 8  # the seq is the u64 at offset 8 of a record's header
    segment.write_bytes(bytes(data))


@pytest.mark.parametrize("unclean", [False, True], ids=["clean", "unclean"])
def test_a_record_whose_header_seq_was_damaged_is_corrupt_and_does_not_move_the_numbering(tmp_path, capsys, unclean):
    """Bit 40 of the newest record's header seq flipped: the body's CRC still matches. Trusted, the daemon resumed at
    2**40 + 30 with nothing counted or logged, and every subscriber then saw a duplicate and a gap of 2**40 results.
    The record is counted corrupt and kept (it is whole: not cut as a torn tail), numbering resumes after the accepted
    mark, and readers report it instead of returning it under the damaged seq."""
    path = tmp_path / "j"
    j = Journal(path, max_bytes=1 << 20)
    for seq in range(30):
        j.mark_accepted("cam0", seq)
        j.append("cam0", seq, result("cam0", seq))
    j.close()
    if unclean:
        (path / journal_format.CLEAN_MARK).unlink()
    segment = journal_format.segment_files(path / "cam0")[-1][1]
    flip_header_seq(segment, 29, 40)
    size = segment.stat().st_size
    capsys.readouterr()
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.status()["corrupt"] == 1
    assert "journal_corrupt_record" in capsys.readouterr().out
    assert reopened.last_seq("cam0") == 28
    assert reopened.resume("cam0") == (30, range(29, 30))
    assert segment.stat().st_size == size
    reopened.mark_accepted("cam0", 30)
    reopened.append("cam0", 30, result("cam0", 30))
    reopened.close()
    with pytest.raises(journal_format.JournalCorrupt, match=r"header seq 1099511627805 is not its result's 29"):
        list(read_since(path, "cam0", 20))
    reported: list[tuple[Path, int, int]] = []
    assert [s for s, _ in read_since(path, "cam0", 20, on_corrupt=lambda *a: reported.append(a))] == [
        *range(21, 29),
        30,
    ]
    assert len(reported) == 1 and reported[0][0] == segment
    assert journal_format.newest_seq(path, "cam0") == 30
    again = Journal(path, max_bytes=1 << 20)
    assert again.status()["corrupt"] == 1 and again.resume("cam0")[0] == 31
    again.close()
