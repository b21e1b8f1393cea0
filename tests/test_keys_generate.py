"""`inspectd keys generate --out DIR` into a folder a daemon reads as its allow-list: refused in one line, before a
secret key is written there, since the daemon refuses an allow-list holding one, whole, at its next start or reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.protocol import keys

REPO = Path(__file__).resolve().parents[1]


def _generate(out: Path, name: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "inspectd", "keys", "generate", "--out", str(out), "--name", name]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)


def test_generate_into_an_allow_list_is_refused_in_one_line_and_leaves_it_as_it_was(tmp_path):
    """The pair was written and the run said to put the public key in an allow-list; the daemon then refused the
    whole list for the secret beside it and stopped."""
    allowed = tmp_path / "clients"
    allowed.mkdir(mode=0o755)
    for client in ("operator1", "bridge0"):
        public, _ = keys.generate(tmp_path / client, client)
        (allowed / public.name).write_bytes(public.read_bytes())
    before = keys.load_allow_list(allowed)
    done = _generate(allowed, "bridge1")
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr == (
        f"inspectd keys: --out {allowed}: holds public keys (bridge0.key, operator1.key) and no secret key, as a "
        "daemon's allow-list does, which a bridge1.key_secret there would make it refuse whole; expected a folder for "
        "the pair: generate into another one and copy bridge1.key in\n"
    )
    assert sorted(os.listdir(allowed)) == ["bridge0.key", "operator1.key"]
    assert keys.load_allow_list(allowed) == before


@pytest.mark.parametrize("held", [[], ["server"], ["server.key"]], ids=["empty", "a pair already", "a server key"])
def test_generate_into_a_folder_of_key_pairs_or_an_empty_one_writes_the_pair(tmp_path, held):
    """The daemon's own key folder holds its pair and may take another (a second socket's); a new folder, or one
    made empty, holds nothing to tell it from a client's; a client's folder often holds the one public key of the
    daemon it connects to."""
    out = tmp_path / "keys"
    out.mkdir(mode=0o700)
    for name in held:
        if name.endswith(".key"):
            public, _ = keys.generate(tmp_path / "daemon", name.removesuffix(".key"))
            (out / name).write_bytes(public.read_bytes())
        else:
            keys.generate(out, name)
    done = _generate(out, "bridge1")
    assert done.returncode == 0, done.stderr
    public, secret = keys.load_secret(out / "bridge1.key_secret")
    assert keys.load_public(out / "bridge1.key") == public and len(secret) == 40
