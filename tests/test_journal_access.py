"""Who may read the results journal: the daemon's journal under the units' UMask=0077 is readable by group inspectd
(operators run `inspectd subscribe --journal` as its members), also one an older writer left service-user-only, and a
journal this user may not read is one line and exit 2 from subscribe, never a traceback. Real writer, real files,
the real `inspectd subscribe` run as another user (tests/other_user.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.daemon.journal import Journal
from other_user import as_nobody
from ports import free_port
from test_journal import result

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]
COUNT = 60
ROOT = os.geteuid() == 0


def write_journal(directory: Path, first: int = 0, count: int = COUNT) -> None:
    """Results first..first+count-1 of cam0, as the daemon writes them under the units' UMask=0077: an accepted mark
    per frame, the record, several segments, a clean close."""
    umask = os.umask(0o077)
    try:
        journal = Journal(directory, max_bytes=1 << 20, segment_bytes=2 << 10)
        for seq in range(first, first + count):
            journal.mark_accepted("cam0", seq)
            journal.append("cam0", seq, result("cam0", seq))
        journal.close()
    finally:
        os.umask(umask)


def modes(directory: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(directory.stat().st_mode)}
    found.update({p.relative_to(directory).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*")})
    return found


def subscribe(directory: Path, *extra: str, group: int) -> subprocess.CompletedProcess:
    """`inspectd subscribe --journal DIRECTORY` as user nobody in `group` (no daemon: it replays and times out)."""
    command = [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", f"tcp://127.0.0.1:{free_port()}"]
    command += ["--journal", str(directory), "--timeout", "4", *extra]
    return subprocess.run(as_nobody(command, group=group), capture_output=True, text=True, cwd=REPO, timeout=60)


def replayed(proc: subprocess.CompletedProcess) -> list[int]:
    assert proc.returncode == 0, proc.stderr
    return [int(line.split()[1].removeprefix("seq=")) for line in proc.stdout.splitlines()]


def test_the_journal_is_readable_by_its_group_whatever_the_umask(open_tmp_path):
    directory = open_tmp_path / "journal"
    write_journal(directory)
    found = modes(directory)
    segments = [name for name in found if name.endswith(".seg")]
    assert len(segments) >= 3, found
    assert {"cam0/accepted", "cam0/reserved", "clean"} <= found.keys(), found
    dirs = {".", "cam0"}
    assert {name: mode for name, mode in found.items() if mode != (0o750 if name in dirs else 0o640)} == {}
    # A member of the daemon's group (this process's, which owns what it created) replays all of it.
    proc = subscribe(directory, "--since", "-1", "--count", str(COUNT), group=os.getegid())
    assert replayed(proc) == list(range(COUNT))


def test_a_journal_an_older_writer_left_to_its_user_alone_is_opened_to_the_group(open_tmp_path):
    directory = open_tmp_path / "journal"
    write_journal(directory)
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)  # what the writer made of it under UMask=0077 before
    (directory / "clean").unlink()  # and killed: the next open reads every segment
    write_journal(directory, first=COUNT, count=5)
    found = modes(directory)
    dirs = {".", "cam0"}
    assert {name: mode for name, mode in found.items() if mode != (0o750 if name in dirs else 0o640)} == {}
    proc = subscribe(directory, "--since", "-1", "--count", str(COUNT + 5), group=os.getegid())
    assert replayed(proc) == list(range(COUNT + 5))


@pytest.mark.parametrize("since", [("--since", "-1"), ()], ids=["since", "live"])
@pytest.mark.parametrize("closed", [".", "cam0", "cam0/000000000000.seg"], ids=["journal", "camera", "segment"])
def test_a_journal_this_user_may_not_read_is_one_line_and_exit_2(open_tmp_path, closed, since):
    directory = open_tmp_path / "journal"
    write_journal(directory)
    # Left to the writer's user alone (an older writer under UMask=0077). Root reads everything: the reader runs as
    # nobody, a member of the group; as any other user it is the owner, shut out by mode 0.
    path = directory / closed
    path.chmod((0o700 if path.is_dir() else 0o600) if ROOT else 0)
    proc = subscribe(directory, *since, group=os.getegid())
    what = "it" if closed == "." else closed
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"inspectd subscribe: journal {directory}: cannot read {what} (Permission denied), expected a journal this "
        f"user may read (as the daemon's user or a member of its group)"
    ]


def test_a_folder_above_the_journal_this_user_may_not_enter_is_one_line_and_exit_2(open_tmp_path):
    """A user outside the daemon's group stops at /var/lib/inspectd (0750), above the journal: Path.is_dir() raised
    PermissionError there, a traceback."""
    directory = open_tmp_path / "state" / "journal"
    write_journal(directory)
    (open_tmp_path / "state").chmod(0o700 if ROOT else 0)
    proc = subscribe(directory, "--since", "-1", group=os.getegid())
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == [
        f"inspectd subscribe: journal {directory}: cannot read it (Permission denied), expected a journal this "
        f"user may read (as the daemon's user or a member of its group)"
    ]


def test_folders_the_writer_makes_above_the_journal_let_the_group_in(open_tmp_path):
    directory = open_tmp_path / "results" / "day" / "journal"
    write_journal(directory)
    assert stat.S_IMODE((open_tmp_path / "results").stat().st_mode) == 0o750
    assert stat.S_IMODE((open_tmp_path / "results" / "day").stat().st_mode) == 0o750
    proc = subscribe(directory, "--since", "-1", "--count", str(COUNT), group=os.getegid())
    assert replayed(proc) == list(range(COUNT))


def test_another_cameras_folder_this_user_may_not_read_does_not_refuse_a_subscriber_of_one_camera(open_tmp_path):
    directory = open_tmp_path / "journal"
    write_journal(directory)
    journal = Journal(directory, max_bytes=1 << 20)
    for seq in range(3):
        journal.mark_accepted("cam1", seq)
        journal.append("cam1", seq, result("cam1", seq))
    journal.close()
    (directory / "cam1").chmod(0o700 if ROOT else 0)
    proc = subscribe(directory, "--since", "-1", "--count", str(COUNT), "--camera", "cam0", group=os.getegid())
    assert replayed(proc) == list(range(COUNT))
    assert subscribe(directory, "--since", "-1", group=os.getegid()).returncode == 2
