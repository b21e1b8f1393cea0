"""Suite-wide test environment.

The daemon refuses to run as root (inspectd.daemon.security.refuse_root). Test containers and CI runners often are root,
so daemons the tests start are allowed to be, explicitly, here and nowhere else; tests/test_security.py removes
the variable again to check the refusal itself.

`tmp_path_open_to_others`: for a test whose child runs as another user (tests/other_user.py).
"""

import os
import stat
from pathlib import Path

import pytest

from inspectd.daemon.security import ALLOW_ROOT_ENV

if os.geteuid() == 0:
    os.environ[ALLOW_ROOT_ENV] = "1"


@pytest.fixture
def tmp_path_open_to_others(tmp_path):
    """tmp_path and each folder above it that this user owns opened to others (0711 added) for the test, their modes
    put back after it: pytest's folders are 0700, and a child running as another user must reach files in tmp_path.
    Left open, /tmp/pytest-of-USER would stay so for every later test and run."""
    opened = []
    for folder in (tmp_path, *tmp_path.parents):
        mode = stat.S_IMODE(folder.stat().st_mode)
        if folder != Path("/") and folder.stat().st_uid == os.geteuid() and mode | 0o711 != mode:
            folder.chmod(mode | 0o711)
            opened.append((folder, mode))
    yield tmp_path
    for folder, mode in reversed(opened):
        folder.chmod(mode)


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
