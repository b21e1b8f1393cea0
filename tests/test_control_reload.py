"""The control `reload` of a running in-process Daemon over its real CurveZMQ control socket: what the reply says when
the allow-lists reload and the bundle does not."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from daemon_harness import in_process_config
from inspectd.protocol import keys
from inspectd.protocol.control import BUNDLE_REFUSED, client_for
from station_model import write_grey_bundle

pytestmark = pytest.mark.timeout(60)


def _station(tmp_path):
    """A daemon whose control socket lets in two keys, operator and leaked; started."""
    from inspectd.daemon.config import parse_config
    from inspectd.daemon.service import Daemon

    _, server_secret = keys.generate(tmp_path / "keys", "server")
    server_public = tmp_path / "keys" / "server.key"
    operator_public, operator_secret = keys.generate(tmp_path / "keys", "operator")
    leaked_public, _ = keys.generate(tmp_path / "keys", "leaked")
    allowed = tmp_path / "allowed"
    allowed.mkdir(mode=0o755)
    allowed.chmod(0o755)
    (allowed / "operator.key").write_bytes(operator_public.read_bytes())
    (allowed / "leaked.key").write_bytes(leaked_public.read_bytes())
    bundle = write_grey_bundle(tmp_path / "bundle")
    base = in_process_config(tmp_path, bundle, {"kind": "synthetic", "rate_hz": 20, "width": 64, "height": 64})
    endpoint = f"ipc://{tmp_path}/control.sock"
    control = parse_config(
        {
            "station": "s1",
            "model": {"bundle": str(bundle)},
            "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
            "control": {
                "endpoint": endpoint,
                "curve": {"server_secret_key": str(server_secret), "allowed_clients_dir": str(allowed)},
            },
            "state_dir": str(tmp_path / "state"),
        }
    ).control
    daemon = Daemon(dataclasses.replace(base, control=control))
    daemon.start()
    return daemon, endpoint, server_public, operator_secret


def test_a_reload_whose_bundle_is_refused_still_says_which_keys_its_allow_list_reload_removed(tmp_path):
    """Revoking a key (its file removed, then `reload`) while the bundle on disk is refused: the key is out all the
    same, and the refusal carries the allow-list result, so the operator learns the revocation happened."""
    daemon, endpoint, server_public, operator_secret = _station(tmp_path)
    allowed, bundle = tmp_path / "allowed", tmp_path / "bundle"
    try:
        assert daemon.control_curve is not None and len(daemon.control_curve.allowed) == 2
        (allowed / "leaked.key").unlink()  # the revocation
        (bundle / "manifest.json").write_text("{ not json")  # the bundle on disk is refused meanwhile
        with client_for(endpoint, 10, server_public, operator_secret) as client:
            reply = client.request({"cmd": "reload"})
        assert reply["ok"] is False and reply[BUNDLE_REFUSED] is True, reply
        assert "manifest.json" in reply["error"], reply
        removed = reply["allow_lists"]["control"]["removed"]
        assert len(removed) == 1 and "leaked" in str(removed[0]), reply["allow_lists"]
        assert len(daemon.control_curve.allowed) == 1
    finally:
        daemon.shutdown()


def test_ctl_reload_prints_the_allow_list_change_before_the_bundles_refusal(tmp_path):
    """`inspectd ctl reload` as an operator runs it: a refused bundle exits 1 with its one line, and the lines before
    it say that the revoked key was removed all the same."""
    daemon, endpoint, server_public, operator_secret = _station(tmp_path)
    try:
        (tmp_path / "allowed" / "leaked.key").unlink()
        (tmp_path / "bundle" / "manifest.json").write_text("{ not json")
        ctl = subprocess.run(
            [sys.executable, "-m", "inspectd", "ctl", "--endpoint", endpoint, "--server-key", str(server_public)]
            + ["--client-key", str(operator_secret), "reload"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        daemon.shutdown()
    lines = ctl.stderr.splitlines()
    assert ctl.returncode == 1 and len(lines) == 2, ctl
    assert lines[0].startswith("inspectd ctl: reload: allow-list control: removed ") and "leaked" in lines[0], lines
    assert lines[1].startswith("inspectd ctl: reload: ") and "manifest.json" in lines[1], lines
