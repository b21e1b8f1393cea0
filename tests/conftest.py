"""Suite-wide test environment.

The daemon refuses to run as root (inspectd.daemon.security.refuse_root). Test containers and CI runners often are root,
so daemons the tests start are allowed to be, explicitly, here and nowhere else; tests/test_security.py removes
the variable again to check the refusal itself.

`open_tmp_path`: for a test whose child runs as another user (tests/other_user.py).

`@pytest.mark.exclusive`: a test whose bounds on time or packet loss hold on a machine it has to itself runs while no
other worker of a parallel run (pytest -n) runs a test.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from inspectd.daemon.security import ALLOW_ROOT_ENV

if os.geteuid() == 0:
    os.environ[ALLOW_ROOT_ENV] = "1"

# One OpenMP thread for torch here and in every child: the suite runs a worker per core (pytest -n), and a torch op's
# threads spin while they wait for a core another worker holds. Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@contextlib.contextmanager
def _held(tmp_path_factory, alone: bool):
    """A lock on a file every worker sees, shared, or alone. The gate is a turnstile: a test waiting to hold the lock
    alone holds the gate, so the other workers' next tests queue behind it instead of keeping the shared lock taken
    between them forever."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(shared / "exclusive.gate", "a") as gate, open(shared / "exclusive.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield


_MODULE_ALONE: list[bool] = [False]


@pytest.fixture(autouse=True, scope="module")
def _exclusive_module(request, tmp_path_factory):
    """A module marked exclusive runs alone from its first fixture to its last test, at the cost of one wait for the
    other workers' current tests rather than one per test."""
    if request.node.get_closest_marker("exclusive") is None:
        yield
        return
    with _held(tmp_path_factory, alone=True):
        _MODULE_ALONE[0] = True
        try:
            yield
        finally:
            _MODULE_ALONE[0] = False


@pytest.fixture(autouse=True)
def _exclusive(request, tmp_path_factory):
    if _MODULE_ALONE[0]:
        yield
        return
    with _held(tmp_path_factory, alone=request.node.get_closest_marker("exclusive") is not None):
        yield


@pytest.fixture
def open_tmp_path():
    """A temporary folder another user can reach (0711, straight under /tmp, which is 1777), removed
    after the test. pytest's own tmp_path lies under 0700 folders shared by every test of the run, and by every worker
    of a parallel run: opening and closing those again per test would race."""
    path = Path(tempfile.mkdtemp(prefix="inspectd-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    # Tests take read or list rights away from folders in it: given back first, so that removing works as any user.
    for parent, folders, _ in os.walk(path):
        for folder in folders:
            if not os.path.islink(os.path.join(parent, folder)):
                os.chmod(os.path.join(parent, folder), 0o700)
    shutil.rmtree(path)


@pytest.fixture
def ingest_threads():
    """Camera ingest threads a test starts (append each): stopped and joined after it, every one of them ended."""
    started: list = []
    yield started
    for ingest in started:
        ingest.stop()
    for ingest in started:
        ingest.join(10)
        assert not ingest.is_alive()


@pytest.fixture
def pki(tmp_path):
    """CurveZMQ keys: a server pair, an allowed client pair (its public key in the allow-list) and an intruder pair,
    each (public key file, secret key file)."""
    from inspectd.protocol import keys

    d = tmp_path / "keys"
    server = keys.generate(d / "server", "server")
    allowed = keys.generate(d / "clients-own", "bridge1")
    intruder = keys.generate(d / "intruder", "intruder")
    allow_dir = d / "allowed"
    allow_dir.mkdir(mode=0o755)
    os.chmod(allow_dir, 0o755)
    (allow_dir / "bridge1.key").write_bytes(allowed[0].read_bytes())
    return {"server": server, "allowed": allowed, "intruder": intruder, "allow_dir": allow_dir}
