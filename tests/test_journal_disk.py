"""The journal writer when its disk misbehaves under it: full at the first start after a reboot (a real 3 MB tmpfs,
filled by another file), and its directory removed while it writes (real files, really deleted)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from inspectd.daemon.journal import BOOT_ID, Journal
from inspectd.protocol import journal as journal_format
from inspectd.protocol.journal import read_since
from test_archive import fill, small_disk  # noqa: F401 - the fixture by name: a real tmpfs, unmounted after
from test_journal import result

pytestmark = pytest.mark.timeout(60)


def power_cut(journal: Journal) -> None:
    """The machine goes down under an open journal: nothing closes it, and the syncer stops where it was."""
    journal._stop.set()
    journal._syncer.join(5)


def rebooted_onto_a_full_disk(disk: Path) -> tuple[Path, Path]:
    """(journal folder, the file filling its disk): 300 results journalled (reserved, synced, to 513), a power cut
    that lost the accepted mark with the page cache, another boot id, and a full disk (a runaway log): the mark, the
    boot id and any record now need room the disk does not have."""
    path = disk / "j"
    first = Journal(path, max_bytes=1 << 20)
    for seq in range(300):
        first.mark_accepted("cam0", seq)
        first.append("cam0", seq, result("cam0", seq))
    first.sync()
    power_cut(first)
    (path / "cam0" / journal_format.ACCEPTED_MARK).unlink()
    (path / journal_format.BOOT_MARK).write_text("an-earlier-boot\n")
    return path, fill(disk)


def test_a_full_disk_at_the_first_start_after_a_reboot_starts_degraded_and_gives_out_no_seq_twice(small_disk):  # noqa: F811
    path, filler = rebooted_onto_a_full_disk(small_disk)

    degraded = Journal(path, max_bytes=1 << 20, retry_s=0.0)  # refused to start before: "cannot use it (No space...)"
    assert degraded.unclean and degraded.rebooted
    assert degraded.resume("cam0") == (514, range(300, 514))  # nothing published before the cut is numbered again
    status = degraded.status()
    assert status["degraded"] and "No space left" in status["error"], status
    degraded.append("cam0", 514, result("cam0", 514))
    assert degraded.status()["lost"] == 1 and degraded.last_seq("cam0") == 299
    degraded.close()
    assert not (path / journal_format.CLEAN_MARK).exists()  # withheld: the floors are not on disk

    # Stopped cleanly, started again on the same boot with the disk still full: the reboot is handled again.
    again = Journal(path, max_bytes=1 << 20, retry_s=0.0)
    assert again.rebooted and again.resume("cam0") == (514, range(300, 514))
    # Room returns (the archive deleted its oldest frames): the next append writes the floors, the boot mark and
    # its record, and the journal is healthy again.
    filler.unlink()
    again.mark_accepted("cam0", 514)
    again.append("cam0", 514, result("cam0", 514))
    status = again.status()
    assert not status["degraded"] and status["written"] == 1, status
    assert (path / journal_format.BOOT_MARK).read_text() == BOOT_ID.read_text().strip()
    again.close()
    after = Journal(path, max_bytes=1 << 20)
    assert not after.unclean and not after.rebooted and after.resume("cam0") == (515, range(515, 515))
    assert [s for s, _ in read_since(path, "cam0", 298)] == [299, 514]
    after.close()


def test_a_mark_the_full_disk_left_empty_does_not_count_as_the_floor(small_disk):  # noqa: F811
    """The daemon marks each frame before its result: on the full disk that mark's first write is refused, leaving
    an empty file open. The floors retry took the open file for a written floor and synced it empty; the clean stop
    then let the next start on this boot resume from the last record, below seqs published before the power cut."""
    path, _ = rebooted_onto_a_full_disk(small_disk)
    degraded = Journal(path, max_bytes=1 << 20, retry_s=0.0)
    first_seq, _ = degraded.resume("cam0")
    for seq in range(first_seq, first_seq + 20):
        degraded.mark_accepted("cam0", seq)
        degraded.append("cam0", seq, result("cam0", seq))
    degraded.close()
    again = Journal(path, max_bytes=1 << 20, retry_s=0.0)
    assert again.resume("cam0")[0] >= 514, again.resume("cam0")  # past every seq the reservation covered
    again.close()


def test_a_state_dir_that_is_not_a_directory_is_still_refused_on_a_full_disk(small_disk):  # noqa: F811
    (small_disk / "j").write_text("x")
    fill(small_disk)
    with pytest.raises(journal_format.JournalError, match=r"^publish.journal.path .*j: cannot use it"):
        Journal(small_disk / "j", max_bytes=1 << 20)


def test_a_journal_directory_removed_while_writing_is_recreated_and_what_went_into_the_deleted_file_counts_lost(
    tmp_path, capsys
):
    path = tmp_path / "j"
    journal = Journal(path, max_bytes=1 << 20, fsync_interval_s=0.2)
    for seq in range(50):
        journal.mark_accepted("cam0", seq)
        journal.append("cam0", seq, result("cam0", seq))
    deadline = time.monotonic() + 10
    while journal.status()["unsynced"] and time.monotonic() < deadline:  # the syncer's round: seen still on disk
        time.sleep(0.02)
    assert journal.status()["unsynced"] == 0
    shutil.rmtree(path)  # an operator freeing space
    for seq in range(50, 60):  # into the deleted segment, which the next round of the syncer finds
        journal.mark_accepted("cam0", seq)
        journal.append("cam0", seq, result("cam0", seq))
    deadline = time.monotonic() + 10
    while journal.status()["unsynced"] and time.monotonic() < deadline:
        time.sleep(0.02)
    for seq in range(60, 100):
        journal.mark_accepted("cam0", seq)
        journal.append("cam0", seq, result("cam0", seq))
    status = journal.status()
    assert (status["written"], status["lost"], status["degraded"]) == (90, 10, False), status
    assert "journal_segment_removed" in capsys.readouterr().out
    assert [s for s, _ in read_since(path, "cam0", -1)] == list(range(60, 100))
    # Its marks were opened again: a reservation is on disk at once, past every seq given out.
    assert journal_format.read_mark(path / "cam0", journal_format.RESERVED_MARK) >= 99
    journal.close()
    assert (path / journal_format.BOOT_MARK).exists() and (path / journal_format.CLEAN_MARK).exists()
    reopened = Journal(path, max_bytes=1 << 20)
    assert reopened.resume("cam0") == (100, range(100, 100))
    reopened.close()
