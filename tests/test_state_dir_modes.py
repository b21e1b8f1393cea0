"""The folders the daemon creates for itself under the units' UMask=0077 (the state_dir and those above it, a control
ipc socket's folder): each is 0750, so a member of the service's group reaches control.sock (0660) and runs
`inspectd ctl status`, and a folder that already existed keeps its mode. A real daemon started under umask 077, the
real `inspectd ctl` run as another user (tests/other_user.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import Station
from other_user import as_nobody
from station_model import write_grey_bundle

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("where", ["state_dir", "own_folder"])
def test_folders_the_daemon_creates_let_its_group_reach_the_control_socket(open_tmp_path, where):
    existing = open_tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o711)  # made by someone else, searchable by all: left as it is
    state_dir = existing / "line2" / "state"
    control = state_dir / "control.sock" if where == "state_dir" else existing / "run" / "inspectd" / "control.sock"
    created = [existing / "line2", state_dir]
    if where == "own_folder":
        created += [control.parent.parent, control.parent]
    bundle = write_grey_bundle(open_tmp_path / "bundle")
    station = Station(
        open_tmp_path,
        bundle,
        [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}],
        preexec_fn=lambda: os.umask(0o077),  # the units' UMask=0077
        state_dir=str(state_dir),
        control={"endpoint": f"ipc://{control}"},
    )
    try:
        station.wait_ready()
        assert {str(path): oct(_mode(path)) for path in created} == {str(path): "0o750" for path in created}
        assert oct(_mode(existing)) == "0o711"
        assert oct(_mode(control)) == "0o660"
        if os.geteuid() != 0:
            pytest.skip("connecting as another user needs root to become one")
        # nobody, in the daemon's group: the socket file's group may connect, and reaches it through the folders.
        command = [sys.executable, "-m", "inspectd", "ctl", "--endpoint", f"ipc://{control}", "--timeout", "10"]
        done = subprocess.run(
            as_nobody([*command, "status"], group=os.getegid()), capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert (done.returncode, done.stderr) == (0, ""), done
        assert done.stdout.startswith("station t1: "), done.stdout
    finally:
        assert station.stop() == 0, station.log_tail()


def test_a_folder_made_under_a_group_shared_parent_keeps_taking_its_group(tmp_path):
    """A parent with the set-group-ID bit (a folder shared by a group) passes it down to what is made in it; the
    0750 chmod dropped it, so the folders below the new one took their maker's group instead."""
    from inspectd.durable import make_dirs

    shared = tmp_path / "shared"
    shared.mkdir()
    if os.geteuid() == 0:
        os.chown(shared, -1, 65534)  # a group other than the maker's
    shared.chmod(0o2770)
    made = make_dirs(shared / "a" / "b")
    assert made == [shared / "a", shared / "a" / "b"]
    for folder in made:
        assert folder.stat().st_mode & stat.S_ISGID, oct(folder.stat().st_mode)
        assert _mode(folder) & 0o777 == 0o750 and folder.stat().st_gid == shared.stat().st_gid


def test_a_control_socket_folder_that_cannot_be_made_is_named_with_its_key(tmp_path):
    from inspectd.daemon.control import ControlServer
    from inspectd.errors import InspectdError

    blocker = tmp_path / "run"
    blocker.write_text("a file where the folder should be")
    endpoint = f"ipc://{blocker}/inspectd/control.sock"
    with pytest.raises(InspectdError) as refused:
        ControlServer(endpoint, object()).start()
    assert str(refused.value).startswith(f"control.endpoint {endpoint}: cannot create its folder {blocker}")
    assert "expected a folder the daemon's user may create or one that exists" in str(refused.value)
