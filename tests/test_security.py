"""Who gets in, over real sockets: CurveZMQ control and publish sockets with an allow-list, wrong and missing keys
refused (and logged), key-file permission checks, `inspectd keys generate`, control on a network address refused
without CURVE, and the daemon refusing to run as root."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import structlog
import yaml
import zmq

from inspectd.clients.subscribe import Subscriber
from inspectd.daemon.config import parse_config
from inspectd.daemon.control import ControlServer
from inspectd.daemon.frames import Frame
from inspectd.daemon.inference import Judged
from inspectd.daemon.notify import PARENT_PID_ENV
from inspectd.daemon.publish import Publisher
from inspectd.daemon.security import ALLOW_ROOT_ENV, CurveServer, refuse_root
from inspectd.errors import ConfigError, InspectdError
from inspectd.protocol import keys
from inspectd.protocol.control import ControlClient, ControlTimeout
from inspectd.protocol.keys import curve_client, is_local_endpoint
from ports import free_port
from station_model import QUIET_STATUS

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]
# A plain client at a CurveZMQ socket: the mechanism mismatch is named when the client reads the daemon's greeting
# before the daemon hangs up, else libzmq has no reason to give.
PLAIN_REFUSED = r"requires CurveZMQ there|ended the handshake without a reason, expected an inspectd endpoint"


class Handler:
    def status(self):
        return {"healthy": True}


def test_keys_generate_cli_writes_a_private_pair_and_never_overwrites(tmp_path):
    cmd = [sys.executable, "-m", "inspectd", "keys", "generate", "--out", str(tmp_path / "k"), "--name", "server"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert first.returncode == 0, first.stderr
    secret, public = tmp_path / "k" / "server.key_secret", tmp_path / "k" / "server.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = keys.load_secret(secret)
    assert keys.load_public(public) == pub and len(sec) == 40
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert keys.load_secret(secret) == (pub, sec)  # untouched


def test_keys_generate_into_a_file_names_out_and_says_it_is_no_directory(tmp_path):
    """A file in --out's place printed the raw `[Errno 17] File exists`, naming neither --out nor what was expected."""
    (tmp_path / "f").write_text("")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    cmd = [sys.executable, "-m", "inspectd", "keys", "generate", "--out", str(tmp_path / "gone"), "--name", "server"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.stderr == (
        f"inspectd keys: --out {tmp_path / 'gone'}: cannot create (a link to nothing, {tmp_path / 'nowhere'}), "
        "expected a directory for the key pair\n"
    )
    for out in (tmp_path / "f", tmp_path / "f" / "k"):
        cmd = [sys.executable, "-m", "inspectd", "keys", "generate", "--out", str(out), "--name", "server"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
        assert (done.returncode, done.stderr) == (
            1,
            f"inspectd keys: --out {out}: cannot create (Not a directory), expected a directory for the key pair\n",
        )


def _generate(out: Path, name: str = "server", preexec_fn=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "inspectd", "keys", "generate", "--out", str(out), "--name", name]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO, preexec_fn=preexec_fn)


@pytest.mark.parametrize("cut", ["first file", "second file"])
def test_keys_generate_that_cannot_write_leaves_nothing_and_a_rerun_makes_the_pair(tmp_path, cut):
    """A disk that filled up mid-write (RLIMIT_FSIZE here) left a truncated server.key, or a whole one and a cut
    secret, and the rerun refused with "keys are never overwritten" as if a real pair were protected. Now the run
    says nothing was left, leaves no file at all, and the rerun writes the pair."""
    sizes = sorted(path.stat().st_size for path in keys.generate(tmp_path / "sizes", "server"))
    assert sizes[0] < sizes[1], sizes  # a limit between the two lets one file through whole
    limit = 64 if cut == "first file" else (sizes[0] + sizes[1]) // 2
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "k"
    failed = _generate(out, preexec_fn=small_files)
    assert sorted(os.listdir(out)) == [], failed.stderr
    assert (failed.returncode, failed.stderr) == (
        1,
        f"inspectd keys: --out {out}: cannot write the key pair (File too large); nothing was left behind\n",
    )
    again = _generate(out)
    assert again.returncode == 0, again.stderr
    public, secret = keys.load_secret(out / "server.key_secret")
    assert keys.load_public(out / "server.key") == public and len(secret) == 40
    assert sorted(os.listdir(out)) == ["server.key", "server.key_secret"]


def test_keys_generate_refuses_a_link_at_the_secret_name_and_writes_nothing_through_it(tmp_path):
    """A link to nothing at NAME.key_secret passed the existence check, got the secret written to its target, and ctl
    reported the link as the secret (which the daemon then refuses as a link). A name taken by a link, dangling or
    not, is taken: refused, nothing created there or at the target."""
    out, target = tmp_path / "k", tmp_path / "elsewhere" / "stolen"
    out.mkdir()
    target.parent.mkdir()
    (out / "server.key_secret").symlink_to(target)
    done = _generate(out)
    assert (done.returncode, done.stderr) == (
        1,
        f"inspectd keys: {out / 'server.key_secret'}: already exists, expected a new key name (keys are never "
        "overwritten)\n",
    )
    assert not target.exists() and not os.listdir(target.parent)
    assert sorted(os.listdir(out)) == ["server.key_secret"] and (out / "server.key_secret").is_symlink()


def test_key_files_with_loose_permissions_are_refused(pki, tmp_path):
    secret = pki["server"][1]
    os.chmod(secret, 0o640)
    with pytest.raises(keys.KeysError, match=r"mode 0640 lets group/others read it, expected 0600"):
        keys.load_secret(secret, "control.curve.server_secret_key")
    os.chmod(secret, 0o600)
    with pytest.raises(keys.KeysError, match="holds a public key only, expected the .key_secret file of its pair"):
        keys.load_secret(_as_secret_copy(pki["server"][0]))
    os.chmod(pki["allow_dir"], 0o775)
    with pytest.raises(keys.KeysError, match="lets group/others change it, expected at most 0755"):
        keys.load_allow_list(pki["allow_dir"])
    os.chmod(pki["allow_dir"], 0o755)
    listed = pki["allow_dir"] / "bridge1.key"
    os.chmod(listed, 0o664)  # a key file anyone in the group can rewrite lets the group in
    with pytest.raises(keys.KeysError, match=r"bridge1.key: mode 0664 lets group/others change it"):
        keys.load_allow_list(pki["allow_dir"])
    os.chmod(listed, 0o644)
    os.chown(listed, 4242, -1)  # owned by another user (the tests run as root, which may chown)
    with pytest.raises(keys.KeysError, match=r"bridge1.key: owned by uid 4242, expected the daemon's own user"):
        keys.load_allow_list(pki["allow_dir"])
    os.chown(listed, os.geteuid(), -1)
    link = pki["allow_dir"] / "linked.key"
    link.symlink_to(pki["intruder"][0])
    with pytest.raises(keys.KeysError, match=r"linked.key: a symbolic link"):
        keys.load_allow_list(pki["allow_dir"])
    link.unlink()
    dir_link = tmp_path / "allowed-link"
    dir_link.symlink_to(pki["allow_dir"])
    with pytest.raises(keys.KeysError, match=r"allowed-link: a symbolic link"):
        keys.load_allow_list(dir_link)
    secret_link = tmp_path / "server-link.key_secret"
    secret_link.symlink_to(secret)
    with pytest.raises(keys.KeysError, match=r"server-link.key_secret: a symbolic link"):
        keys.load_secret(secret_link)
    (pki["allow_dir"] / "oops.key_secret").write_bytes(pki["intruder"][1].read_bytes())
    with pytest.raises(keys.KeysError, match="a secret key in the allow-list"):
        keys.load_allow_list(pki["allow_dir"])


def _as_secret_copy(public: Path) -> Path:
    """A public key file under a secret key's name, mode 0600: the mix-up an operator can make."""
    copy = public.parent / "mixup.key_secret"
    copy.write_bytes(public.read_bytes())
    os.chmod(copy, 0o600)
    return copy


def _key_text(path: Path, half: str) -> str:
    found = re.search(rf'{half}-key = "([^"]*)"', path.read_text())
    assert found is not None, path
    return found.group(1)


def malformed_secret(pki, how: str) -> Path:
    """A copy of the server's .key_secret, mode 0600 and ours, whose key text was damaged as a hand copy, a line wrap
    or an editor can damage it, or whose public half belongs to another pair."""
    source = pki["server"][1]
    text, secret = source.read_text(), _key_text(source, "secret")
    if how == "cut":
        text = text.replace(secret, secret[:30])
    elif how == "not-z85":
        text = text.replace(secret, "~" + secret[1:])
    else:  # "two-pairs"
        text = text.replace(_key_text(source, "public"), _key_text(pki["intruder"][0], "public"))
    damaged = source.parent / f"{how}.key_secret"
    damaged.write_text(text)
    os.chmod(damaged, 0o600)
    return damaged


MALFORMED = ["cut", "not-z85", "two-pairs"]
NOT_ITS_SECRET = "its secret key is not the 40-character Z85 secret of its public key, expected a .key_secret file"


@pytest.mark.parametrize("how", MALFORMED)
def test_a_key_file_whose_key_text_is_damaged_is_refused_at_load_naming_it(pki, how):
    """Checked only for length before, a damaged key passed every loader and failed far away: `Invalid argument` from
    the daemon after its model loaded, a traceback from the bridge, a zmq camera reopening for ever, `ctl` blaming its
    --endpoint. Now it is refused where it is loaded, in one line naming the file."""
    damaged = malformed_secret(pki, how)
    with pytest.raises(keys.KeysError, match=rf"^control.curve.server_secret_key {re.escape(str(damaged))}: "):
        CurveServer("control", damaged, pki["allow_dir"])
    ctl = subprocess.run(
        [sys.executable, "-m", "inspectd", "ctl", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "2"]
        + ["--server-key", str(pki["server"][0]), "--client-key", str(damaged), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert (ctl.returncode, ctl.stderr) == (2, f"inspectd ctl: client secret key {damaged}: {NOT_ITS_SECRET} "
                                            "from `inspectd keys generate`, unedited\n")  # fmt: skip


def test_a_public_key_that_is_not_z85_or_a_file_holding_a_secret_is_refused_in_the_allow_list(pki):
    listed = pki["allow_dir"] / "bridge1.key"
    good = listed.read_text()
    public = _key_text(listed, "public")
    listed.write_text(good.replace(public, "~" + public[1:]))  # 40 characters, one of them outside Z85
    with pytest.raises(keys.KeysError, match=r"bridge1.key: no 40-character Z85 public key, expected a key file"):
        keys.read_allow_list(pki["allow_dir"], "control.curve.allowed_clients_dir")
    # A client's whole pair dropped in as a .key: the secret would be on the station for anyone who reads the list.
    listed.write_text(pki["allowed"][1].read_text())
    with pytest.raises(keys.KeysError, match=r"bridge1.key: holds a secret key, expected the public NAME.key"):
        keys.read_allow_list(pki["allow_dir"], "control.curve.allowed_clients_dir")


def test_key_errors_of_a_client_name_the_file_and_what_was_expected(pki, tmp_path):
    """`inspectd ctl` with its keys mixed up is told what is wrong with which file; the station's secret handed to a
    client as its --server-key is refused, though a server would have accepted the connection."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()

    def ctl(server_key: Path, client_key: Path) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "inspectd", "ctl", "--endpoint", endpoint, "--timeout", "5"]
            + ["--server-key", str(server_key), "--client-key", str(client_key), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        return done.returncode, done.stderr

    server_public, server_secret = pki["server"]
    client_public, client_secret = pki["allowed"]
    try:
        assert ctl(server_public, client_secret)[0] == 0
        assert ctl(server_secret, client_secret) == (
            2,
            f"inspectd ctl: server public key {server_secret}: holds a secret key, expected the public NAME.key of "
            "the pair (copy NAME.key, never NAME.key_secret)\n",
        )
        assert ctl(server_public, client_public) == (
            2,
            f"inspectd ctl: client secret key {client_public}: holds a public key only, expected the .key_secret "
            "file of its pair\n",
        )
        missing = tmp_path / "nowhere.key"
        assert ctl(missing, client_secret) == (
            2,
            f"inspectd ctl: server public key {missing}: cannot load (No such file or directory), expected a key "
            "file from `inspectd keys generate`\n",
        )
        if os.geteuid() == 0:  # only root may give a file away
            os.chown(client_secret, 4242, -1)
            assert ctl(server_public, client_secret) == (
                2,
                f"inspectd ctl: client secret key {client_secret}: owned by uid 4242, expected this user (uid 0)\n",
            )
    finally:
        server.stop()
        guard.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user's needs root to make")
def test_a_secret_key_file_another_user_owns_is_refused_naming_its_owner_though_unreadable(open_tmp_path):
    """The usual slip: a .key_secret made or copied by root (0600), used by the service user or an operator. That user
    cannot read it, and is told whose it is (chown is the fix), not that it cannot be loaded."""
    from other_user import NOBODY, as_nobody

    keys_dir = open_tmp_path / "keys"
    server = keys.generate(keys_dir, "server")
    operator = keys.generate(keys_dir, "operator")
    keys_dir.chmod(0o755)
    done = subprocess.run(
        as_nobody([sys.executable, "-m", "inspectd", "ctl", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "5"]
                  + ["--server-key", str(server[0]), "--client-key", str(operator[1]), "status"]),
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (
        2,
        f"inspectd ctl: client secret key {operator[1]}: owned by uid 0, expected this user (uid {NOBODY})\n",
    )


def test_curve_control_lets_in_only_listed_keys_and_logs_refusals(pki, capsys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    try:
        good = curve_client(pki["server"][0], pki["allowed"][1])
        with ControlClient(endpoint, timeout_s=5, curve=good) as client:
            assert client.request({"cmd": "status"}) == {"ok": True, "healthy": True}
        # Each refused client is told why, not left to wait for an answer that never comes.
        intruder = curve_client(pki["server"][0], pki["intruder"][1])
        with ControlClient(endpoint, timeout_s=1.5, curve=intruder) as client:
            with pytest.raises(InspectdError, match="the daemon refused this client's key, expected --client-key"):
                client.request({"cmd": "status"})
        wrong_server = curve_client(pki["intruder"][0], pki["allowed"][1])  # a key that is not the daemon's
        with ControlClient(endpoint, timeout_s=1.5, curve=wrong_server) as client:
            with pytest.raises(InspectdError, match="a --server-key that is not its public key"):
                client.request({"cmd": "status"})
        with ControlClient(endpoint, timeout_s=1.5) as plain:  # no CURVE at all
            with pytest.raises(InspectdError, match=PLAIN_REFUSED):
                plain.request({"cmd": "reload"})
        deadline = time.monotonic() + 5
        while guard.refused < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.refused >= 3
        assert server.requests == 1  # no refused client got a request through to the handler
    finally:
        server.stop()
        guard.stop()
    out = capsys.readouterr().out
    intruder_key = keys.load_public(pki["intruder"][0]).decode()
    assert "auth_refused" in out and intruder_key in out and "handshake failed: " in out


def test_a_tcp_connection_that_never_starts_its_curve_handshake_is_dropped_within_seconds(pki):
    """libzmq holds every accepted tcp connection, one descriptor each, until its handshake ends or 30 s pass: about a
    thousand idle connects by anyone who can reach the port, with no key, used up the daemon's 1024 descriptors and its
    journal fsyncs failed. A CURVE server socket now drops a connection that has not finished its handshake within
    keys.HANDSHAKE_IVL_S; a listed client is answered all along."""
    import socket

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    host, port = endpoint[len("tcp://") :].rsplit(":", 1)
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    idle = []
    try:
        with structlog.testing.capture_logs() as logs:
            idle = [socket.create_connection((host, int(port)), timeout=1) for _ in range(20)]
            # Bounded wait, well under libzmq's 30 s default: each idle connection must be closed by the server.
            deadline = time.monotonic() + 22
            closed = 0
            for conn in idle:
                while True:
                    conn.settimeout(max(0.05, deadline - time.monotonic()))
                    try:
                        if not conn.recv(4096):  # the server's greeting comes first, then the close
                            break
                    except (ConnectionResetError, BrokenPipeError):
                        break
                    except TimeoutError:
                        raise AssertionError(f"{closed} of {len(idle)} idle connections closed within 22 s") from None
                closed += 1
            # Said as the timer's doing, not as a client that hung up: wait for the watcher to log it.
            until = time.monotonic() + 10
            while not any("not finished within the handshake limit" in str(e.get("reason")) for e in logs):
                assert time.monotonic() < until, [e for e in logs if e["event"] == "auth_refused"]
                time.sleep(0.05)
        good = curve_client(pki["server"][0], pki["allowed"][1])
        with ControlClient(endpoint, timeout_s=5, curve=good) as client:
            assert client.request({"cmd": "status"}) == {"ok": True, "healthy": True}
    finally:
        for conn in idle:
            conn.close()
        server.stop()
        guard.stop()


def _judged(seq: int) -> Judged:
    """An error result of cam0 at `seq`, for a Publisher without a daemon behind it."""
    frame = Frame("cam0", seq, f"f{seq}", time.time(), None, error="x")
    return Judged(frame, "error", None, None, "m", 1, [], None, "x")


def test_curve_publish_reaches_only_allowed_subscribers(pki, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("publish", pki["server"][1], pki["allow_dir"])
    pub = Publisher(
        endpoint,
        "s1",
        status_interval_s=0.1,
        socket_options=guard,
        status=lambda: QUIET_STATUS,
    ).start()
    good = Subscriber(endpoint, curve=curve_client(pki["server"][0], pki["allowed"][1]))
    bad = Subscriber(endpoint, curve=curve_client(pki["server"][0], pki["intruder"][1]))
    plain = Subscriber(endpoint)
    try:
        assert isinstance(good.recv(5.0), dict)  # status arrives: the subscription is live
        for seq in range(5):
            pub.submit(_judged(seq))
        assert [r.seq for r in good.results(5, timeout_s=5)] == list(range(5))
        assert bad.recv(1.0) is None and plain.recv(0.5) is None
        assert guard.refused >= 2
        # Shut out, each subscriber can tell why (it would otherwise just hear nothing, as from a daemon that is down).
        assert good.handshake_failure() is None
        assert "refused this client's key" in bad.handshake_failure()
        assert re.search(PLAIN_REFUSED, plain.handshake_failure())
        # `inspectd subscribe` with a server key that is not the daemon's says so once, on stderr, and keeps waiting.
        cli = subprocess.run(
            [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", endpoint, "--timeout", "3"]
            + ["--server-key", str(pki["intruder"][0]), "--client-key", str(pki["allowed"][1])],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        lines = [line for line in cli.stderr.splitlines() if "the daemon" in line]
        assert lines == [
            f"inspectd subscribe: --endpoint {endpoint}: the daemon ended the CurveZMQ handshake without a reason: "
            "a --server-key that is not its public key, no CurveZMQ there (expected no --server-key/--client-key), "
            "its authenticator down or hung, a link too slow for its handshake limit (10 s), or no inspectd endpoint "
            "there"
        ], cli.stderr
    finally:
        for s in (good, bad, plain):
            s.close()
        pub.stop(5)
        guard.stop()


def test_network_control_endpoint_requires_curve_and_curve_config_is_typed(tmp_path):
    base = {"station": "s", "model": {"bundle": "b"}, "cameras": [{"id": "c", "source": {"kind": "synthetic"}}]}
    for endpoint in ("tcp://0.0.0.0:5570", "tcp://192.0.2.4:5570", "tcp://eth0:5570", "tcp://*:5570"):
        with pytest.raises(ConfigError, match=r"^control.curve: required when control.endpoint is a network"):
            parse_config({**base, "control": {"endpoint": endpoint}})
    for endpoint in ("tcp://127.0.0.1:5570", "tcp://localhost:1", "tcp://[::1]:5570", "ipc:///x/c.sock"):
        assert is_local_endpoint(endpoint)
        parse_config({**base, "control": {"endpoint": endpoint}})
    curve = {"server_secret_key": "k/server.key_secret", "allowed_clients_dir": "allowed"}
    config = parse_config(
        {**base, "control": {"endpoint": "tcp://0.0.0.0:5570", "curve": curve}, "publish": {"curve": curve}},
        base_dir=tmp_path,
    )
    assert config.control.curve.server_secret_key == tmp_path / "k" / "server.key_secret"
    assert config.publish.curve.allowed_clients_dir == tmp_path / "allowed"
    with pytest.raises(ConfigError, match=r"^publish.curve: expected null or a mapping with exactly"):
        parse_config({**base, "publish": {"curve": {"server_secret_key": "x"}}})
    with pytest.raises(ConfigError, match=r"^control.curve.allowed_clients_dir: expected a path string"):
        parse_config({**base, "control": {"curve": {**curve, "allowed_clients_dir": 5}}})


@pytest.mark.parametrize("damage", ["mode-0644", "secret-cut"])
def test_daemon_start_refuses_loose_or_damaged_key_material(pki, tmp_path, damage):
    """`inspectd run` checks key material at start, before it loads a model or binds anything (a damaged secret key
    used to pass, and the start failed after the model had loaded with `Invalid argument`, naming nothing)."""
    if damage == "mode-0644":
        secret, said = pki["server"][1], "mode 0644 lets group/others read it"
        os.chmod(secret, 0o644)
    else:
        secret, said = malformed_secret(pki, "cut"), NOT_ITS_SECRET
    config = tmp_path / "c.yaml"
    config.write_text(
        "station: s\nmodel: {bundle: nowhere}\ncameras: [{id: c, source: {kind: synthetic}}]\n"
        f"control: {{endpoint: 'tcp://0.0.0.0:{free_port()}', curve: {{server_secret_key: '{secret}', "
        f"allowed_clients_dir: '{pki['allow_dir']}'}}}}\nmetrics: {{listen: null}}\nstate_dir: '{tmp_path}/state'\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert out.returncode == 2  # a refused key is a config the daemon refuses: not retried by the unit
    assert f"inspectd run: control.curve.server_secret_key {secret}: {said}" in out.stderr, out.stderr


def test_the_daemon_refuses_to_run_as_root(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ROOT_ENV}
    env["PYTHONPATH"] = str(REPO)
    config = tmp_path / "c.yaml"
    config.write_text("station: s\nmodel: {bundle: b}\ncameras: [{id: c, source: {kind: synthetic}}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=tmp_path,
    )
    if os.geteuid() == 0:
        # 2: not retried by the unit (RestartPreventExitStatus=2); with 1 systemd restarted it every 10 s.
        assert out.returncode == 2 and "refusing to run as root (uid 0)" in out.stderr, out.stderr
        os.environ.pop(ALLOW_ROOT_ENV, None)
        try:
            with pytest.raises(InspectdError, match="refusing to run as root"):
                refuse_root()
        finally:
            os.environ[ALLOW_ROOT_ENV] = "1"
    else:
        # Not root: the check lets it through, and the run fails later for the missing bundle instead.
        refuse_root()
        assert "refusing to run as root" not in out.stderr and out.returncode != 0


def _daemon(tmp_path: Path, config: dict) -> tuple[subprocess.Popen, Path]:
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inspectd", "run", "--config", str(path)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        # A test that fails before its own stop must not leave the daemon running once pytest has gone.
        env={**os.environ, "PYTHONPATH": str(REPO), PARENT_PID_ENV: str(os.getpid())},
    )
    return proc, log


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM, as systemd stops the daemon: its exit status; killed, then TimeoutExpired, where it has not ended in
    30 s (a daemon left running would outlive the test and its files)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_daemon_on_a_network_address_lets_in_only_allowed_keys(pki, tmp_path):
    from engines.bundle import thresholds as thresholds_doc
    from engines.bundle.store import write_bundle
    from test_faults import M, poison_graph  # the same hand-built model as the fault tests

    bundle = tmp_path / "bundle"
    write_bundle(
        bundle,
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": M, "width": M, "channels": 1, "resize": "stretch"},
            "scorer_inputs": ["centre"],
            "score_kind": "max",
        },
        poison_graph(),
        {"centre": np.array([128.0], np.float32)},
        {},
        thresholds_doc.first_version(0.5, 0.5, {"tool": "test_security"}),
    )
    curve = {"server_secret_key": str(pki["server"][1]), "allowed_clients_dir": str(pki["allow_dir"])}
    control = f"tcp://127.0.0.1:{free_port()}"
    publish = f"tcp://127.0.0.1:{free_port()}"
    frames_in = f"tcp://127.0.0.1:{free_port()}"
    proc, log = _daemon(
        tmp_path,
        {
            "station": "sec",
            "model": {"bundle": str(bundle)},
            "cameras": [
                {"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 20, "width": 64, "height": 64}},
                {"id": "cam1", "source": {"kind": "zmq", "endpoint": frames_in, "curve": curve}},
            ],
            "publish": {"endpoint": publish, "status_interval_s": 0.2, "curve": curve},
            "control": {"endpoint": control, "curve": curve},
            "metrics": {"listen": None},
            "state_dir": str(tmp_path / "state"),
        },
    )
    good = curve_client(pki["server"][0], pki["allowed"][1])
    bad = curve_client(pki["server"][0], pki["intruder"][1])
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                with ControlClient(control, timeout_s=2, curve=good) as client:
                    status = client.request({"cmd": "status"})
                break
            except ControlTimeout:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
        assert status["ok"] and status["station"] == "sec"
        with (
            ControlClient(control, timeout_s=1.5, curve=bad) as client,
            pytest.raises(InspectdError, match="refused this client's key"),
        ):
            client.request({"cmd": "reload"})
        with ControlClient(control, timeout_s=1.5) as client, pytest.raises(InspectdError, match=PLAIN_REFUSED):
            client.request({"cmd": "reload"})
        with Subscriber(publish, curve=good) as ok_sub, Subscriber(publish, curve=bad) as bad_sub:
            assert len(ok_sub.results(3, timeout_s=20)) == 3
            assert bad_sub.recv(1.0) is None
        producer = zmq.Context.instance().socket(zmq.PUSH)  # a frame producer whose key is not listed
        producer.linger = 0
        bad(producer)
        producer.connect(frames_in)
        with ControlClient(control, timeout_s=5, curve=good) as client:
            deadline = time.monotonic() + 10
            while not client.request({"cmd": "status"})["auth_refused"].get("ingest-cam1"):
                assert time.monotonic() < deadline, "the zmq camera's refusals are not in status"
                time.sleep(0.1)
            producer.close()
            refused = client.request({"cmd": "status"})["auth_refused"]
            # Who may steer the line: a threshold far outside every calibrated version is refused unless forced.
            far = {"version": 2, "image_threshold": 1e300, "pixel_threshold": 0.5}
            reply = client.request({"cmd": "set_thresholds", "thresholds": far})
            assert not reply["ok"] and reply["error"].startswith("thresholds.image_threshold: 1e+300 is outside")
            assert client.request({"cmd": "set_thresholds", "thresholds": {**far, "image_threshold": 0.6}})["ok"]
            forced = {**far, "version": 3, "image_threshold": 40.0}
            assert client.request({"cmd": "set_thresholds", "thresholds": forced, "force": True})["ok"]
        assert refused["control"] >= 2 and refused["publish"] >= 1, refused

        # The allow-list is read again on SIGHUP: the intruder's key is listed now, and gets in.
        (pki["allow_dir"] / "late.key").write_bytes(pki["intruder"][0].read_bytes())
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "allow_list_reloaded" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        with ControlClient(control, timeout_s=5, curve=bad) as client:
            assert client.request({"cmd": "status"})["ok"]
        # Revoked over the control channel's own reload: the first client's key is gone, so is its access, on a
        # connection made before the reload as on a new one.
        held = ControlClient(control, timeout_s=5, curve=good)
        held_sub = Subscriber(publish, curve=good)
        assert held.request({"cmd": "status"})["ok"] and held_sub.recv(5.0) is not None
        (pki["allow_dir"] / "bridge1.key").unlink()
        with ControlClient(control, timeout_s=30, curve=bad) as client:
            reloaded = client.request({"cmd": "reload"})
        for role in ("control", "publish", "ingest-cam1"):
            assert [r.split()[0] for r in reloaded["allow_lists"][role]["removed"]] == ["bridge1.key"], role
        assert reloaded["ok"]
        with (
            ControlClient(control, timeout_s=1.5, curve=good) as client,
            pytest.raises(InspectdError, match="refused this client's key"),
        ):
            client.request({"cmd": "status"})
        with held, held_sub:
            refused_held = held.request({"cmd": "status"})
            assert refused_held["ok"] is False and "allow-list" in refused_held["error"], refused_held
            time.sleep(0.5)  # the publisher's re-bind, and the reconnects it sets off
            while held_sub.recv(0) is not None:
                pass
            assert held_sub.recv(1.5) is None, "a subscriber whose key was removed still gets results"
    finally:
        assert _stop(proc) == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    reloads = [e for e in events if e.get("event") == "allow_list_reloaded" and e["domain"] == "control"]
    intruder_key = keys.load_public(pki["intruder"][0]).decode()
    assert reloads[0]["added"] == [f"late.key ({intruder_key})"] and reloads[0]["removed"] == []
    assert reloads[1]["removed"][0].startswith("bridge1.key (")
    # Every command is logged with the CURVE key that sent it.
    commands = [e for e in events if e.get("event") == "control_command"]
    assert {e["client"] for e in commands} == {
        f"curve:{keys.load_public(pki['allowed'][0]).decode()}",
        f"curve:{intruder_key}",
    }
    assert any(e["cmd"] == "set_thresholds" and e["force"] for e in commands)
    reasons = {(e["domain"], e["reason"]) for e in events if e.get("event") == "auth_refused"}
    assert ("control", "client key not in the allow-list") in reasons
    assert any(d == "control" and r.startswith("handshake failed: ") for d, r in reasons), reasons
    assert ("publish", "client key not in the allow-list") in reasons


def test_journal_outside_the_state_dir_is_refused_at_load(tmp_path):
    proc, log = _daemon(
        tmp_path,
        {
            "station": "s",
            "model": {"bundle": "nowhere"},
            "cameras": [{"id": "c", "source": {"kind": "synthetic"}}],
            "metrics": {"listen": None},
            "publish": {"journal": {"path": str(tmp_path / "elsewhere")}},
            "state_dir": str(tmp_path / "state"),
        },
    )
    assert proc.wait(30) == 2  # a config refusal, as `run --check` refuses it
    assert "publish.journal.path: " in log.read_text() and "outside state_dir" in log.read_text()
    assert not (tmp_path / "elsewhere").exists()


def test_curve_fails_closed_when_the_authenticator_is_gone(pki):
    """With no ZAP handler answering, libzmq's default is to let every CURVE client in: the enforced ZAP domain
    turns that into refusing everyone, and the server reports the authenticator as dead (the daemon goes unhealthy)."""
    from inspectd.daemon import security

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    try:
        good = curve_client(pki["server"][0], pki["allowed"][1])
        with ControlClient(endpoint, timeout_s=5, curve=good) as client:
            assert client.request({"cmd": "status"})["ok"] is True
        assert guard.alive()
        authenticator = security._authenticators[zmq.Context.instance()]
        authenticator.stop()
        assert not guard.alive()
        for key in (pki["intruder"][1], pki["allowed"][1]):  # a new connection, listed or not, gets nothing
            with ControlClient(endpoint, timeout_s=1.5, curve=curve_client(pki["server"][0], key)) as client:
                with pytest.raises(InspectdError):
                    client.request({"cmd": "status"})
        assert server.requests == 1
    finally:
        server.stop()
        guard.stop()
        security._zap(zmq.Context.instance())  # a fresh authenticator for the tests after this one


def test_a_zmq_camera_on_a_network_address_requires_curve_and_takes_frames_only_from_listed_producers(pki, tmp_path):
    import threading

    from inspectd.daemon.ingest.zmq_pull import ZmqPullSource

    base = {"station": "s", "model": {"bundle": "b"}, "state_dir": str(tmp_path)}
    network = {"id": "cam0", "source": {"kind": "zmq", "endpoint": "tcp://0.0.0.0:5560"}}
    with pytest.raises(ConfigError, match=r"^cameras\[0\]\.source\.curve: required when endpoint is a network"):
        parse_config({**base, "cameras": [network]})
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    curve = {"server_secret_key": str(pki["server"][1]), "allowed_clients_dir": str(pki["allow_dir"])}
    config = parse_config(
        {**base, "cameras": [{"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint, "curve": curve}}]}
    )
    source = ZmqPullSource(config.cameras[0], clock=time.time)
    stop = threading.Event()
    source.open(stop)
    connect = endpoint.replace("0.0.0.0", "127.0.0.1")

    def push(client_key: Path | None, frame_id: str) -> None:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.linger = 2000
        if client_key is not None:
            curve_client(pki["server"][0], client_key)(sock)
        sock.connect(connect)
        header = {"frame_id": frame_id, "dtype": "uint8", "encoding": "raw", "shape": [4, 4]}
        sock.send_multipart([json.dumps(header).encode(), bytes(16)])
        sock.close()

    try:
        for key, frame_id in ((pki["intruder"][1], "intruder"), (None, "plain"), (pki["allowed"][1], "listed")):
            threading.Thread(target=push, args=(key, frame_id), daemon=True).start()
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "listed" not in got:
            frame = source.read(stop)
            if frame is not None:
                got.append(frame.frame_id)
        deadline = time.monotonic() + 1.5  # the refused ones would have arrived by now, had they been let in
        while time.monotonic() < deadline:
            frame = source.read(stop)
            if frame is not None:
                got.append(frame.frame_id)
        assert got == ["listed"]
        assert source.curve is not None and source.curve.refused >= 1
    finally:
        source.close()
        if source.curve is not None:
            source.curve.stop()


def test_a_curve_socket_in_its_own_context_gets_the_allow_list_and_its_context_still_terminates(pki):
    """libzmq asks the ZAP handler of the socket's own context: a socket made in another context than the process's
    must get one there (before, none answered and every client got in; with the domain enforced, none would)."""
    import threading

    guard = CurveServer("publish", pki["server"][1], pki["allow_dir"])
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.linger = 0
    guard(pub)
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        with (
            Subscriber(endpoint, curve=curve_client(pki["server"][0], pki["allowed"][1])) as listed,
            Subscriber(endpoint, curve=curve_client(pki["server"][0], pki["intruder"][1])) as intruder,
        ):
            deadline = time.monotonic() + 10
            got = None
            while got is None and time.monotonic() < deadline:
                pub.send_multipart([b"inspect.x", b"y"])
                if listed.socket.poll(100):
                    got = listed.socket.recv_multipart()
            assert got == [b"inspect.x", b"y"]
            pub.send_multipart([b"inspect.x", b"z"])
            assert not intruder.socket.poll(1000)
        assert guard.refused >= 1
    finally:
        pub.close()
        guard.stop()
    ended = threading.Thread(target=context.term, daemon=True)
    ended.start()
    ended.join(10)
    assert not ended.is_alive(), "the context's term() hangs on a ZAP handler left running"


def test_a_key_removed_by_reload_is_shut_out_of_connections_made_before_it(pki, tmp_path):
    """CURVE checks a key only at the handshake: after a reload that removes it, a control client, a subscriber and
    a frame producer that connected earlier must lose their access too, while the keys still listed keep theirs."""
    import threading

    from inspectd.daemon.ingest.zmq_pull import ZmqPullSource

    operator = keys.generate(tmp_path / "keys" / "operator", "operator")
    (pki["allow_dir"] / "operator.key").write_bytes(operator[0].read_bytes())
    revoked = curve_client(pki["server"][0], pki["allowed"][1])
    kept = curve_client(pki["server"][0], operator[1])

    control_guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    control = ControlServer(f"tcp://127.0.0.1:{free_port()}", Handler(), curve=control_guard)
    publish_guard = CurveServer("publish", pki["server"][1], pki["allow_dir"])
    pub = Publisher(
        f"tcp://127.0.0.1:{free_port()}", "s1", status_interval_s=0.05, socket_options=publish_guard,
        status=lambda: QUIET_STATUS,
    )  # fmt: skip
    curve = {"server_secret_key": str(pki["server"][1]), "allowed_clients_dir": str(pki["allow_dir"])}
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    camera = parse_config(
        {"station": "s", "model": {"bundle": "b"}, "state_dir": str(tmp_path),
         "cameras": [{"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint, "curve": curve}}]}
    ).cameras[0]  # fmt: skip
    source = ZmqPullSource(camera, clock=time.time)
    stop = threading.Event()
    producers = []

    def producer(hook) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.linger = 0
        hook(sock)
        sock.connect(endpoint)
        producers.append(sock)
        return sock

    def push(sock: zmq.Socket, frame_id: str) -> None:
        header = {"frame_id": frame_id, "dtype": "uint8", "encoding": "raw", "shape": [4, 4]}
        sock.send_multipart([json.dumps(header).encode(), bytes(16)])

    def frames(seconds: float) -> list[str]:
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            frame = source.read(stop)
            if frame is not None:
                got.append(frame.frame_id)
        return got

    control.start()
    pub.start()
    source.open(stop)
    try:
        held, held_kept = ControlClient(control.endpoint, 5, revoked), ControlClient(control.endpoint, 5, kept)
        sub, sub_kept = Subscriber(pub.bound_endpoint, curve=revoked), Subscriber(pub.bound_endpoint, curve=kept)
        push_revoked, push_kept = producer(revoked), producer(kept)
        assert held.request({"cmd": "status"})["ok"] and held_kept.request({"cmd": "status"})["ok"]
        assert isinstance(sub.recv(5.0), dict) and isinstance(sub_kept.recv(5.0), dict)
        push(push_revoked, "before")
        assert frames(2.0) == ["before"]

        (pki["allow_dir"] / "bridge1.key").unlink()
        for guard in (control_guard, publish_guard, source.curve):
            assert guard is not None and [r.split()[0] for r in guard.reload()["removed"]] == ["bridge1.key"]
        pub.drop_peers()  # what the daemon's reload does when the publish list lost a key

        refused = held.request({"cmd": "status"})
        assert refused["ok"] is False and "allow-list" in refused["error"], refused
        assert held_kept.request({"cmd": "status"}) == {"ok": True, "healthy": True}
        assert control.requests == 3, "the removed key's request never reached the handler"
        assert control_guard.refused >= 1

        push(push_revoked, "after")
        push(push_kept, "kept")
        assert frames(2.0) == ["kept"]
        assert source.curve is not None and source.curve.refused >= 1

        time.sleep(0.5)  # the re-bind, and the reconnects it sets off
        while sub.recv(0) is not None or sub_kept.recv(0) is not None:
            pass
        assert sub.recv(1.5) is None, "a subscriber whose key was removed still gets results"
        assert isinstance(sub_kept.recv(5.0), dict)
        assert pub.rebinds == 1 and publish_guard.refused >= 1
    finally:
        for sock in producers:
            sock.close()
        for closing in (held, held_kept, sub, sub_kept):
            closing.close()
        source.close()
        control.stop()
        pub.stop(5)
        for guard in (control_guard, publish_guard, source.curve):
            if guard is not None:
                guard.stop()


def test_a_refused_handshake_is_told_at_once_not_at_the_request_timeout(pki):
    """`inspectd ctl` or `calibrate --apply` with a key the daemon does not allow, or the wrong --server-key: the
    refusal is known from the handshake in milliseconds, so the command says so then, not after its whole timeout."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    try:
        for server_key, client_key, reason in [
            (pki["server"][0], pki["intruder"][1], "refused this client's key"),
            (pki["intruder"][0], pki["allowed"][1], "a --server-key that is not its public key"),
        ]:
            # At once, and after the handshake was refused before the request (calibrate connects, then loads its
            # bundle): with nowhere to send, a blocking send would have waited out the timeout.
            for pause in (0.0, 0.5):
                with ControlClient(endpoint, timeout_s=60, curve=curve_client(server_key, client_key)) as client:
                    client.connect()
                    time.sleep(pause)
                    started = time.monotonic()
                    with pytest.raises(InspectdError, match=reason):
                        client.request({"cmd": "status"})
                assert time.monotonic() - started < 30, (reason, pause)  # the timeout would be 60 s
        with ControlClient(endpoint, timeout_s=60, curve=curve_client(pki["server"][0], pki["allowed"][1])) as client:
            assert client.request({"cmd": "status"})["ok"]
    finally:
        server.stop()
        guard.stop()


def test_revoking_the_last_key_by_reload_shuts_every_client_out(pki, capsys):
    """An emptied allow-list is how the last client (a stolen laptop's only operator key) is revoked: the reload takes
    it, with a warning, instead of refusing it and leaving the revoked key in force. A start with the list still empty
    (the daemon restarted after the revocation) lets nobody in and still starts."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    listed = curve_client(pki["server"][0], pki["allowed"][1])
    held = ControlClient(endpoint, timeout_s=5, curve=listed)
    refused_once = ControlClient(endpoint, timeout_s=5, curve=listed)
    try:
        assert held.request({"cmd": "status"})["ok"]
        (pki["allow_dir"] / "bridge1.key").unlink()
        assert [r.split()[0] for r in guard.reload()["removed"]] == ["bridge1.key"]
        refused = held.request({"cmd": "status"})
        assert refused["ok"] is False and "allow-list" in refused["error"], refused
        with pytest.raises(InspectdError, match="refused this client's key"):
            refused_once.request({"cmd": "status"})
        assert server.requests == 1
        # Put back by the daemon's SIGHUP (`ctl reload` is shut out too): the control clients, held or refused at
        # their handshake, are answered again, each request of a refused one being made on a new socket.
        (pki["allow_dir"] / "bridge1.key").write_bytes(pki["allowed"][0].read_bytes())
        assert [a.split()[0] for a in guard.reload()["added"]] == ["bridge1.key"]
        assert held.request({"cmd": "status"})["ok"] and refused_once.request({"cmd": "status"})["ok"]
    finally:
        refused_once.close()
        held.close()
        server.stop()
        guard.stop()
    (pki["allow_dir"] / "bridge1.key").unlink()  # revoked again, and the daemon restarted so
    restarted = CurveServer("publish", pki["server"][1], pki["allow_dir"])
    restarted.stop()
    assert restarted.allowed == frozenset()
    warned = [line for line in capsys.readouterr().out.splitlines() if "allow_list_empty" in line]
    assert len(warned) == 2 and all("every client is refused" in line for line in warned), warned


class _Lines(threading.Thread):
    """The lines a child writes to one of its pipes, as they come."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, []

    def run(self) -> None:
        for line in self.pipe:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if re.search(pattern, line)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s: {self.lines}")


@pytest.mark.timeout(120)  # a child's start and two backoff waits on a loaded machine
def test_subscribers_shut_out_by_an_emptied_allow_list_hear_the_daemon_again_once_the_keys_are_back(pki, tmp_path):
    """Emptying the allow-list and reloading revokes every key; putting the keys back and reloading again must let the
    subscribers (`inspectd subscribe`, the web view, on Subscriber) back in. libzmq never retries a connection whose
    key was refused, so the subscriber opens a new socket itself, with backoff. It says once per outage why it is shut
    out, and when it is let in again; what was published meanwhile is a gap, or filled from the journal."""
    from inspectd.clients.subscribe import NO_JOURNAL, CatchUpSubscriber, JournalCatchUp
    from inspectd.daemon.journal import Journal

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("publish", pki["server"][1], pki["allow_dir"])
    journal = Journal(tmp_path / "journal", max_bytes=1 << 20, fsync_interval_s=0.1)
    pub = Publisher(
        endpoint, "s1", status_interval_s=0.1, socket_options=guard, status=lambda: QUIET_STATUS, journal=journal
    ).start()
    listed = pki["allow_dir"] / "bridge1.key"
    key_file = listed.read_bytes()
    cli = subprocess.Popen(
        [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", endpoint, "--status", "--count", "6"]
        + ["--timeout", "50", "--server-key", str(pki["server"][0]), "--client-key", str(pki["allowed"][1])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    out, err = _Lines(cli.stdout), _Lines(cli.stderr)
    out.start()
    err.start()
    sub = Subscriber(endpoint, curve=curve_client(pki["server"][0], pki["allowed"][1]))
    source = CatchUpSubscriber(sub, JournalCatchUp(tmp_path / "journal"))
    got: list[int] = []

    def take(timeout_s: float) -> None:
        message = source.recv(timeout_s)
        if message is not None and not isinstance(message, dict):
            got.append(message.seq)

    try:
        deadline = time.monotonic() + 20
        while not isinstance(source.recv(0.2), dict):
            assert time.monotonic() < deadline, "the subscription never took hold"
        out.wait_for(r"^status ", 20)  # the command's first status: its subscription took hold too
        for seq in range(5):
            pub.submit(_judged(seq))
        out.wait_for(r"^cam0 seq=4 ")
        while len(got) < 5 and time.monotonic() < deadline:
            take(0.2)
        assert got == [0, 1, 2, 3, 4]

        listed.unlink()  # every key revoked, as DEPLOY.md says: the list emptied, then a reload
        assert [r.split()[0] for r in guard.reload()["removed"]] == ["bridge1.key"]
        pub.drop_peers()
        refused = "the daemon refused this client's key"
        err.wait_for(refused)
        deadline = time.monotonic() + 10
        while "refused this client's key" not in (sub.handshake_failure() or ""):
            assert time.monotonic() < deadline, sub.handshake_failure()
            time.sleep(0.05)
        for seq in range(5, 10):  # published while they are shut out
            pub.submit(_judged(seq))
        # Each tries again with a new socket, and is refused again (told once all the same).
        first_refusals = guard.refused
        deadline = time.monotonic() + 10
        while guard.refused < first_refusals + 2 and time.monotonic() < deadline:
            take(0.1)
        retried = guard.refused - first_refusals
        assert got == [0, 1, 2, 3, 4]

        listed.write_bytes(key_file)  # the keys put back, and the list reloaded
        assert [a.split()[0] for a in guard.reload()["added"]] == ["bridge1.key"]
        seq = 10
        deadline = time.monotonic() + 20  # past the subscribers' waits before a new socket, however they fell
        while cli.poll() is None or len(got) < 7:
            assert time.monotonic() < deadline, ("never let in again", got, out.lines, err.lines)
            pub.submit(_judged(seq))
            seq += 1
            take(0.2)
        assert cli.wait(10) == 0, err.lines
        out.join(5)
        err.join(5)

        assert retried >= 2 and sub.reopened >= 2, (retried, sub.reopened)
        # The journal filled in what the subscriber missed while shut out: every seq once, in order.
        assert got == list(range(len(got))) and got[-1] >= 10, got
        assert source.catch_up.recovered >= 5 and sub.handshake_failure() is None
        # The command told the refusal once, then that it was let in, then the results it missed, as a gap.
        seqs = [int(line.split()[1].split("=")[1]) for line in out.lines if line.startswith("cam0 seq=")]
        assert seqs[:5] == [0, 1, 2, 3, 4] and len(seqs) == 6 and seqs[5] >= 10, out.lines
        told = [line for line in err.lines if "the daemon" in line or "let in again" in line or "gap:" in line]
        assert told == [
            f"inspectd subscribe: --endpoint {endpoint}: {refused}, expected --client-key's public half in its "
            "allow-list",
            f"inspectd subscribe: --endpoint {endpoint}: let in again, receiving",
            f"gap: seq 5-{seqs[5] - 1} on cam0 ({seqs[5] - 5} results): {NO_JOURNAL}",
        ], err.lines
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
        sub.close()
        pub.stop(5)
        journal.close()
        guard.stop()


def test_the_web_view_shut_out_by_an_emptied_allow_list_logs_the_refusal_once_and_when_it_is_let_in_again(pki):
    """The web view's feed, shut out by its key's revocation and let in again once it is back, logs why it is shut
    out once, and a line when messages come again: else its log says it is refused long after it shows results."""
    import asyncio

    from structlog.testing import capture_logs

    from inspectd.clients.web import Feed, LineState

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("publish", pki["server"][1], pki["allow_dir"])
    pub = Publisher(endpoint, "s1", status_interval_s=0.1, socket_options=guard, status=lambda: QUIET_STATUS).start()
    listed = pki["allow_dir"] / "bridge1.key"
    key_file = listed.read_bytes()
    loop = asyncio.new_event_loop()
    looping = threading.Thread(target=loop.run_forever, daemon=True)
    looping.start()
    state = LineState()
    feed = Feed(Subscriber(endpoint, curve=curve_client(pki["server"][0], pki["allowed"][1])), loop, state)

    def last_seq() -> int:
        view = state.cameras.get("cam0")
        return -1 if view is None or view.last is None else view.last["seq"]

    def told(event: str) -> list[dict]:
        return [entry for entry in list(logs) if entry["event"] == event]

    try:
        with capture_logs() as logs:
            feed.start()
            deadline = time.monotonic() + 10
            while state.status_at is None:
                assert time.monotonic() < deadline, "the subscription never took hold"
                time.sleep(0.05)
            pub.submit(_judged(0))
            deadline = time.monotonic() + 10
            while last_seq() != 0:
                assert time.monotonic() < deadline, "result 0 never came"
                time.sleep(0.05)

            listed.unlink()  # every key revoked: the list emptied, then a reload
            assert [r.split()[0] for r in guard.reload()["removed"]] == ["bridge1.key"]
            pub.drop_peers()
            deadline = time.monotonic() + 10
            while not told("handshake_failed"):
                assert time.monotonic() < deadline, "the view never said it is shut out"
                time.sleep(0.05)
            listed.write_bytes(key_file)  # put back, and the list reloaded
            assert [a.split()[0] for a in guard.reload()["added"]] == ["bridge1.key"]
            seq = 1
            deadline = time.monotonic() + 20  # past the view's wait before a new socket
            while last_seq() < 1:
                assert time.monotonic() < deadline, ("never let in again", logs)
                pub.submit(_judged(seq))
                seq += 1
                time.sleep(0.2)
            deadline = time.monotonic() + 5
            while not told("readmitted"):  # logged on the feed's thread before the message reaches the loop
                assert time.monotonic() < deadline, logs
                time.sleep(0.05)
            shown = [entry["event"] for entry in list(logs) if entry["event"] in ("handshake_failed", "readmitted")]
    finally:
        feed.stopping.set()
        feed.join(5)
        loop.call_soon_threadsafe(loop.stop)
        looping.join(5)
        loop.close()
        pub.stop(5)
        guard.stop()
    assert shown == ["handshake_failed", "readmitted"], shown
    assert "refused this client's key" in told("handshake_failed")[0]["error"]
    assert told("readmitted")[0]["reopened"] >= 1


def test_a_refusal_without_a_key_names_the_daemons_socket_and_claims_no_peer(pki, capsys):
    """A client without CURVE is refused before any key is seen, and libzmq's socket monitor gives only the bound
    endpoint with the failure: the log says it is the daemon's socket (it was logged as the client's `endpoint`)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    plain = zmq.Context.instance().socket(zmq.REQ)
    plain.linger = 0
    try:
        plain.connect(endpoint.replace("tcp://", "tcp://127.0.0.5:0;"))  # from another address than the daemon's
        plain.send(b"{}")
        deadline = time.monotonic() + 10
        while guard.refused < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.refused >= 1
    finally:
        plain.close()
        server.stop()
        guard.stop()
    logged = [line for line in capsys.readouterr().out.splitlines() if "auth_refused" in line]
    assert logged and all(f"socket={endpoint}" in line for line in logged), logged
    assert not any("endpoint=" in line or "127.0.0.5" in line for line in logged), logged


def test_a_socket_guarded_again_and_again_in_one_process_never_meets_an_earlier_monitors_endpoint(pki):
    """A zmq camera reopened, a server restarted: each guarded socket gets a refusal monitor on an inproc endpoint.
    Named after the socket's fd, as pyzmq names it, the endpoint of a socket just closed may still be bound when the
    next socket gets the same fd, and guarding that one failed with "Address already in use" (0 to 19 of 2000 here)."""
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    context = zmq.Context.instance()
    failed = []
    threads = threading.active_count()
    try:
        for _ in range(8000):
            sock = context.socket(zmq.REP)
            try:
                guard(sock)
            except zmq.ZMQError as exc:
                failed.append(str(exc))
            finally:
                sock.close(linger=0)
            # Each closed socket's watcher ends once its monitor tells it so; on a loaded machine thousands of them
            # fell behind, their monitors passed the context's 1023 sockets, and every later test of the worker failed
            # "Too many open files". A few dozen in flight still meet each fd again at once, which is the race.
            while threading.active_count() > threads + 32:
                time.sleep(0.001)
    finally:
        guard.stop()
    assert not failed, f"{len(failed)} of 8000: {failed[0]}"


def test_each_refused_key_is_logged_even_while_another_keeps_retrying(pki, tmp_path, capsys):
    """Repeats are summarised per (reason, key): a revoked client retrying every 100 ms must not hide the first
    refusal of a key never seen before, and keys made up by the thousand do not grow the table without end."""
    from inspectd.daemon import security

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    second = keys.generate(tmp_path / "keys" / "second", "second")
    try:
        for key in [pki["intruder"][1]] * 5 + [second[1]]:  # the revoked client retrying, then someone new
            with ControlClient(endpoint, timeout_s=0.5, curve=curve_client(pki["server"][0], key)) as client:
                with pytest.raises(InspectdError, match="refused this client's key"):
                    client.request({"cmd": "status"})
        assert guard.refused >= 6
    finally:
        server.stop()
        guard.stop()
    logged = [line for line in capsys.readouterr().out.splitlines() if "auth_refused" in line]
    assert sum(keys.load_public(pki["intruder"][0]).decode() in line for line in logged) == 1, logged
    assert sum(keys.load_public(second[0]).decode() in line for line in logged) == 1, logged
    for i in range(security.ONCE_TRACKED + 500):
        guard.refusals.refused("client key not in the allow-list", client_key=f"made-up-{i}")
    assert len(guard.refusals._once) + len(guard.refusals._again) <= security.ONCE_TRACKED + security.REFUSALS_TRACKED


def test_a_key_refused_every_few_seconds_is_named_through_a_flood_that_turns_the_table_over(monkeypatch, capsys):
    """A flood of hundreds of made-up keys a second turned the table of refused pairs over every few seconds: an
    operator re-running ctl every 4 s was pushed out before its next refusal, so no summary ever named it. Pairs
    refused once are kept apart, many more of them, and go first; a second refusal keeps a pair."""
    from inspectd.daemon import security

    clock = [1000.0]
    monkeypatch.setattr(security, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    # Scaled down with the flood: one table of 50 turns over in 0.15 s; the once-refused, 2000 of them, in 6 s.
    monkeypatch.setattr(security, "REFUSALS_TRACKED", 50)
    monkeypatch.setattr(security, "ONCE_TRACKED", 2000)
    refusals = security._Refusals("control")
    reason = "client key not in the allow-list"
    for tenth in range(3000):  # 300 s of a flood at 320 keys a second, the operator's ctl every 4 s
        clock[0] += 0.1
        for i in range(32):
            refusals.refused(reason, client_key=f"made-up-{tenth}-{i}")
        if tenth % 40 == 0:
            refusals.refused(reason, client_key="operator")
    named = [line for line in capsys.readouterr().out.splitlines() if "operator" in line]
    assert named, "the operator's key was never named"
    assert len(refusals._once) + len(refusals._again) <= 2050


@pytest.fixture
def flood_target(pki, monkeypatch):
    """A control socket with CurveZMQ on tcp, its summary interval cut to 3 s: (endpoint, its CurveServer, the
    server's public key a flood needs, a context for the flood's sockets)."""
    from inspectd.daemon import security

    monkeypatch.setattr(security, "REPEAT_LOG_S", 3.0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    try:
        yield endpoint, guard, keys.load_public(pki["server"][0]), zmq.Context()
    finally:
        server.stop()
        guard.stop()


def made_up_keys_connect(context: zmq.Context, endpoint: str, server_key: bytes, n: int, hold_s: float) -> None:
    """`n` DEALER sockets, each with a key made up on the spot, connected to `endpoint` for `hold_s`: what anyone
    holding the server's public key can do."""
    socks = []
    for _ in range(n):
        public, secret = zmq.curve_keypair()
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
        sock.connect(endpoint)
        socks.append(sock)
    time.sleep(hold_s)
    for sock in socks:
        sock.close(0)


def test_made_up_keys_by_the_hundred_log_a_budget_then_one_summary(pki, capsys, flood_target):
    """The server's public key goes to every client, so anyone holding it can make up a key per connection: a line
    for each (hundreds a second) would have journald's rate limit drop the daemon's own lines. At most
    NEW_LOGGED_PER_INTERVAL new keys are logged per interval, then one line counts the rest; every refusal counts."""
    from inspectd.daemon import security

    endpoint, guard, server_key, context = flood_target
    made_up = 150
    try:
        for _ in range(made_up // 10):
            made_up_keys_connect(context, endpoint, server_key, 10, 0.05)
        deadline = time.monotonic() + 10
        while guard.refused < made_up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.refused >= made_up
        flood = [line for line in capsys.readouterr().out.splitlines() if "auth_refused" in line]
        assert len(flood) == security.NEW_LOGGED_PER_INTERVAL, len(flood)
        # The interval ends: one line counts the keys not named, with nothing more refused meanwhile.
        deadline = time.monotonic() + 8
        summary: list[str] = []
        while not summary and time.monotonic() < deadline:
            time.sleep(0.2)
            summary = [line for line in capsys.readouterr().out.splitlines() if "auth_refused" in line]
        assert len(summary) == 1, summary
        not_named = re.search(r"new_keys_not_logged\W+(\d+)", summary[0])
        not_logged = re.search(r"refusals_not_logged\W+(\d+)", summary[0])
        assert not_named and not_logged, summary
        assert int(not_named[1]) + security.NEW_LOGGED_PER_INTERVAL >= made_up, summary
        assert int(not_logged[1]) + security.NEW_LOGGED_PER_INTERVAL == guard.refused, summary
        # A new interval names new keys again.
        with ControlClient(endpoint, timeout_s=0.5, curve=curve_client(pki["server"][0], pki["intruder"][1])) as c:
            with pytest.raises(InspectdError, match="refused this client's key"):
                c.request({"cmd": "status"})
        named = [line for line in capsys.readouterr().out.splitlines() if "auth_refused" in line]
        assert sum(keys.load_public(pki["intruder"][0]).decode() in line for line in named) == 1, named
    finally:
        context.destroy(0)


def test_a_key_retrying_through_a_flood_of_made_up_keys_is_named_within_an_interval(pki, capsys, flood_target):
    """A flood of one-shot made-up keys spends each interval's budget of new keys in its first moments. A client whose
    key is not listed (an operator's ctl, a revoked bridge) retries all along; before, its slot came due again a
    whole interval after its first refusal, at the same phase, when the budget was already spent, so the log never
    named it. The summary names the keys refused most: a made-up key once, the retrying one every time."""
    from inspectd.daemon import security

    endpoint, guard, server_key, context = flood_target
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            made_up_keys_connect(context, endpoint, server_key, 10, 0.2)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    operator = keys.load_public(pki["intruder"][0]).decode()
    try:
        deadline = time.monotonic() + 5
        while guard.refused < 2 * security.NEW_LOGGED_PER_INTERVAL and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.refused >= 2 * security.NEW_LOGGED_PER_INTERVAL  # this interval's budget is spent
        began = time.monotonic()
        tries = 0
        while time.monotonic() - began < 2.5 * security.REPEAT_LOG_S:
            with ControlClient(endpoint, timeout_s=0.5, curve=curve_client(pki["server"][0], pki["intruder"][1])) as c:
                with pytest.raises(InspectdError, match="refused this client's key"):
                    c.request({"cmd": "status"})
            tries += 1
            time.sleep(0.3)
        assert tries >= 6, tries
        lines = [line for line in capsys.readouterr().out.splitlines() if "auth_refused" in line]
        assert stop.is_set() is False and flooder.is_alive()  # named while the flood still ran
        assert any(operator in line for line in lines), [line for line in lines if "new_keys_not_logged" in line]
        # Still bounded: per interval, the budget, the keys each summary named, and the summary itself.
        intervals = (time.monotonic() - began) / security.REPEAT_LOG_S + 2
        assert len(lines) <= intervals * (security.NEW_LOGGED_PER_INTERVAL + 2 * security.SUMMARY_NAMED + 1), len(lines)
    finally:
        stop.set()
        flooder.join(timeout=5)
        context.destroy(0)


def test_a_key_in_two_allow_list_files_is_named_at_start_and_a_reload_says_which_file_keeps_it_in(pki, tmp_path):
    """Revoking is deleting the key's file and reloading; with the same key also under another name (an old laptop's
    copy), the key stayed in, the reload said `removed=[]` and ctl "unchanged", and nothing named the other file."""
    import structlog

    allow = pki["allow_dir"]
    (allow / "laptop-old.key").write_bytes((allow / "bridge1.key").read_bytes())
    os.chmod(allow / "laptop-old.key", 0o644)
    key = keys.load_public(pki["allowed"][0]).decode()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with structlog.testing.capture_logs() as logs:
        guard = CurveServer("control", pki["server"][1], allow)
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    try:
        warned = [event for event in logs if event["event"] == "allow_list_duplicate_key"]
        assert [(e["client_key"], e["files"]) for e in warned] == [(key, ["bridge1.key", "laptop-old.key"])], logs
        (allow / "bridge1.key").unlink()
        with structlog.testing.capture_logs() as logs:
            changes = guard.reload()
        assert changes == {
            "added": [],
            "removed": [],
            "kept": [f"bridge1.key ({key}): still allowed, the same key is in laptop-old.key"],
        }
        reloaded = [event for event in logs if event["event"] == "allow_list_reloaded"]
        assert reloaded[0]["kept"] == changes["kept"]
        assert not [event for event in logs if event["event"] == "allow_list_duplicate_key"]  # one file left
        # What the reload said is so: the key still gets in, through the other file.
        with ControlClient(endpoint, timeout_s=3, curve=curve_client(pki["server"][0], pki["allowed"][1])) as client:
            assert client.request({"cmd": "status"})["ok"] is True
        (allow / "laptop-old.key").unlink()
        assert guard.reload()["removed"] == [f"laptop-old.key ({key})"]
    finally:
        server.stop()
        guard.stop()


def test_check_notes_a_key_that_two_allow_list_files_hold(tmp_path, pki):
    """`run --check` loads the allow-lists by the loader the daemon starts with, and says when two files hold one key:
    deleting one of them would revoke nothing."""
    from test_run_check import _curve_config, inspectd

    allow = pki["allow_dir"]
    (allow / "laptop-old.key").write_bytes((allow / "bridge1.key").read_bytes())
    os.chmod(allow / "laptop-old.key", 0o644)
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(_curve_config(tmp_path, pki)))
    checked = inspectd("run", "--check", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    key = keys.load_public(pki["allowed"][0]).decode()
    notes = [line for line in checked.stdout.splitlines() if "hold the same key" in line]
    assert notes == [
        f"  note: {where}.curve.allowed_clients_dir {allow}: bridge1.key, laptop-old.key hold the same key {key}: "
        "it stays allowed until every one of them is deleted"
        for where in ("control", "publish", "cameras[1].source")
    ], checked.stdout


def test_an_unread_handshake_watch_never_stalls_the_context(pki):
    """A client shut out retries its handshake without end, and each try is a monitor event. Queued in a bounded
    monitor socket, a few thousand unread ones stopped the context's I/O thread: every other socket of the process
    went silent. The watch's queue has no bound; the owners read it as they go."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Handler(), curve=guard)
    server.start()
    context = zmq.Context()
    try:
        shut_out = context.socket(zmq.REQ)
        shut_out.reconnect_ivl = 1  # thousands of refused handshakes in a second or two
        curve_client(pki["intruder"][0], pki["allowed"][1])(shut_out)  # not the daemon's key
        watch = keys.HandshakeWatch(shut_out, curve=True)
        shut_out.connect(endpoint)
        # Far past the ~2000 unread events that used to fill the monitor queue (each refusal is one).
        deadline = time.monotonic() + 40
        while guard.refused < 4000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert guard.refused >= 4000, guard.refused
        a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        b.send(b"still moving")
        assert a.poll(3000), "the context's I/O thread is stuck behind the unread monitor events"
        assert "a --server-key that is not its public key" in watch.failure()
        watch.close()
        for sock in (shut_out, a, b):
            sock.close(0)
    finally:
        context.destroy(0)
        server.stop()
        guard.stop()


def _threads_and_fds() -> tuple[int, int]:
    """The process's threads as the kernel counts them (libzmq's own included) and its open file descriptors."""
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def test_reopening_a_curve_zmq_camera_leaves_no_thread_or_descriptor_behind(pki, tmp_path):
    """Each open of a CURVE zmq camera watches its socket for refused handshakes. A watcher that outlived its socket
    kept a thread and a descriptor at every reopen: an endpoint that cannot be bound (a producer NIC's address not
    up) reopens every few seconds, and the daemon ran out of descriptors within hours and aborted in libzmq."""
    from inspectd.daemon.ingest.queue import FrameQueue
    from inspectd.daemon.ingest.supervisor import CameraIngest
    from inspectd.daemon.ingest.zmq_pull import ZmqPullSource

    curve = {"server_secret_key": str(pki["server"][1]), "allowed_clients_dir": str(pki["allow_dir"])}

    def camera(endpoint: str):
        return parse_config(
            {
                "station": "s",
                "model": {"bundle": "b"},
                "state_dir": str(tmp_path),
                "cameras": [{"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint, "curve": curve}}],
            }
        ).cameras[0]

    def watching() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "auth-ingest-cam0" and t not in earlier]

    def settled(before: tuple[int, int] | None = None) -> tuple[int, int]:
        """The counts once no watcher of this test is left and none is above `before`, or at the deadline."""
        deadline = time.monotonic() + 10
        now = _threads_and_fds()
        while time.monotonic() < deadline and (
            watching() or (before is not None and (now[0] > before[0] or now[1] > before[1]))
        ):
            time.sleep(0.05)
            now = _threads_and_fds()
        return now

    earlier = {t for t in threading.enumerate() if t.name == "auth-ingest-cam0"}  # an earlier test's, if any
    # TEST-NET-1 is on no interface: every bind fails (EADDRNOTAVAIL) and the camera is reopened, as in the field.
    ingest = CameraIngest(camera("tcp://192.0.2.1:5999"), FrameQueue(4, "block"), backoff_s=(0.01, 0.02))
    source = ZmqPullSource(camera(f"ipc://{tmp_path}/cam0.sock"), clock=time.time)  # rebound at once, unlike a port
    stop = threading.Event()
    source.open(stop)  # the first open starts what stays for the process (libzmq's threads)
    source.close()
    before = settled()  # once this open's watcher has ended
    try:
        ingest.start()
        deadline = time.monotonic() + 20
        while ingest.reopen_count < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ingest.reopen_count >= 30 and ingest.stats()["state"] == "reopening", ingest.stats()
        ingest.stop()
        ingest.join(10)
        assert not ingest.is_alive()
        for _ in range(30):
            source.open(stop)
            source.close()
        threads, fds = settled(before)
        assert threads <= before[0] and fds <= before[1], f"threads {before[0]} -> {threads}, fds {before[1]} -> {fds}"
        assert watching() == []
        source.open(stop)
        assert source.curve is not None and len(source.curve._monitors) == 1  # the ended watchers are let go
        source.close()
    finally:
        ingest.stop()
        source.close()
        for guard in (ingest.curve, source.curve):
            if guard is not None:
                guard.stop()


_STOPPED_BEFORE_ITS_SOCKET = """
import os, sys, threading, time
from pathlib import Path
import zmq
from inspectd.daemon.security import CurveServer

secret, allow, ipc = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
context = zmq.Context.instance()

def open_close(guard, endpoint):
    sock = context.socket(zmq.PULL)
    sock.linger = 0
    guard(sock)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        pass
    sock.close()

def counts():
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))

def settled(before):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (counts()[0] > before[0] or counts()[1] > before[1]):
        time.sleep(0.05)
    return counts()

open_close(CurveServer("warm", secret, allow), "tcp://192.0.2.1:5999")  # libzmq's own threads, for the process
deadline = time.monotonic() + 10
while time.monotonic() < deadline and any(t.name.startswith("auth-") for t in threading.enumerate()):
    time.sleep(0.05)
before = counts()
stopped = CurveServer("control", secret, allow)
sock = context.socket(zmq.REP)
sock.linger = 0
stopped(sock)
sock.bind(ipc)
stopped.stop()  # the socket is still open: its owner's thread had not ended yet
time.sleep(0.5)
sock.close()
guard = CurveServer("ingest-cam0", secret, allow)
for _ in range(20):
    open_close(guard, "tcp://192.0.2.1:5999")
after = settled(before)
watching = sum(t.name.startswith("auth-") for t in threading.enumerate())
print(f"threads {before[0]} -> {after[0]}, fds {before[1]} -> {after[1]}, watchers {watching}", flush=True)
os._exit(0)
"""


def test_a_server_stopped_before_its_socket_closed_leaves_later_sockets_nothing_behind(pki, tmp_path):
    """A refusal watcher that closed its end of the monitor while its socket was still open (a CurveServer stopped
    before its owner closed the socket, or a watcher ended by an error) blocked libzmq's reaper thread for good: from
    then on no socket of the process was freed, and every later reopen of a zmq camera kept its watcher and its
    descriptors. Run in a child process: a blocked reaper would stay for the rest of this one."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _STOPPED_BEFORE_ITS_SOCKET,
            str(pki["server"][1]),
            str(pki["allow_dir"]),
            f"ipc://{tmp_path}/control.sock",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert child.returncode == 0, child.stderr
    found = re.fullmatch(r"threads (\d+) -> (\d+), fds (\d+) -> (\d+), watchers (\d+)\n", child.stdout)
    assert found, child.stdout + child.stderr
    threads_before, threads_after, fds_before, fds_after, watching = map(int, found.groups())
    assert threads_after <= threads_before and fds_after <= fds_before and watching == 0, child.stdout


def _curve_control_daemon(pki, tmp_path: Path) -> tuple[subprocess.Popen, Path, str]:
    """A real daemon (the grey bundle of tests/station_model.py) whose control socket is CURVE on loopback tcp with
    pki's server key and allow-list, answering a listed client: the process, its log and the control endpoint."""
    from station_model import write_grey_bundle

    curve = {"server_secret_key": str(pki["server"][1]), "allowed_clients_dir": str(pki["allow_dir"])}
    control = f"tcp://127.0.0.1:{free_port()}"
    proc, log = _daemon(
        tmp_path,
        {
            "station": "sec",
            "model": {"bundle": str(write_grey_bundle(tmp_path / "bundle"))},
            "engine": {"options": {"intra_op_threads": 1}},
            "cameras": [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 2, "width": 64, "height": 64}}],
            "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
            "control": {"endpoint": control, "curve": curve},
            "metrics": {"listen": None},
            "state_dir": str(tmp_path / "state"),
        },
    )
    good = curve_client(pki["server"][0], pki["allowed"][1])
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                with ControlClient(control, timeout_s=2, curve=good) as client:
                    if client.request({"cmd": "status"})["ok"]:
                        return proc, log, control
            except ControlTimeout:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
    except BaseException:
        proc.kill()  # the caller's finally never runs: its try starts with what this returns
        proc.wait()
        raise


def _ctl(pki, endpoint: str, *argv: str, server_key: Path | None = None) -> subprocess.CompletedProcess:
    """The real `inspectd ctl` with the listed client's key (and pki's server key, or `server_key`), writing to a UTF-8
    pipe as an operator's terminal."""
    server_key = server_key or pki["server"][0]
    command = [sys.executable, "-m", "inspectd", "ctl", "--endpoint", endpoint, "--server-key", str(server_key)]
    command += ["--client-key", str(pki["allowed"][1]), "--timeout", "30", *argv]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_ctl_reload_names_a_key_file_whose_name_is_not_utf8_with_escapes_and_never_crashes(pki, tmp_path):
    """A key file copied from a machine with another encoding (Latin-1 e-acute): its name went into the reload reply
    as a lone surrogate, and ctl, printing who was added, died with a traceback and exit 1 after the daemon had
    already let the key in. The daemon names it with \\xNN; ctl prints whatever a reply holds, also a key file error
    naming such a file."""
    allowed = pki["allow_dir"]
    intruder_key = keys.load_public(pki["intruder"][0]).decode()
    proc, log, control = _curve_control_daemon(pki, tmp_path)
    try:
        (allowed / os.fsdecode(b"op\xe9rateur.key")).write_bytes(pki["intruder"][0].read_bytes())
        added = _ctl(pki, control, "reload")
        assert (added.returncode, added.stderr) == (0, ""), added
        assert f"allow-list control: added op\\xe9rateur.key ({intruder_key})" in added.stdout.splitlines()
        with ControlClient(control, timeout_s=5, curve=curve_client(pki["server"][0], pki["intruder"][1])) as client:
            assert client.request({"cmd": "status"})["ok"]

        damaged = allowed / os.fsdecode(b"d\xe9fectueux.key")
        damaged.write_text("not a key\n")
        refused = _ctl(pki, control, "reload")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused
        line = [row for row in refused.stdout.splitlines() if row.startswith("allow-list control:")]
        assert len(line) == 1 and "NOT reloaded" in line[0] and "d\\" in line[0] and "fectueux.key" in line[0], line

        damaged.unlink()
        (allowed / os.fsdecode(b"op\xe9rateur.key")).unlink()
        removed = _ctl(pki, control, "reload")
        assert (removed.returncode, removed.stderr) == (0, ""), removed
        assert f"allow-list control: removed op\\xe9rateur.key ({intruder_key})" in removed.stdout.splitlines()
    finally:
        assert _stop(proc) == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    reloads = [e for e in events if e.get("event") == "allow_list_reloaded" and e["domain"] == "control"]
    assert [(e["added"], e["removed"]) for e in reloads] == [
        ([f"op\\xe9rateur.key ({intruder_key})"], []),
        ([], [f"op\\xe9rateur.key ({intruder_key})"]),
    ]


def test_a_server_key_pair_rotated_on_disk_is_warned_of_at_reload_and_not_switched_to(pki, tmp_path):
    """An operator who rotates a leaked server key and reloads keeps serving with the old one until a restart: the
    reload said nothing of it, and clients given the new public key were refused with a handshake error of no reason.
    Now each reload whose key file no longer holds the key in use logs `server_key_changed`, naming both keys and that
    a restart is needed; the socket goes on with the key it started with."""
    old_public = tmp_path / "old-server.key"
    old_public.write_bytes(pki["server"][0].read_bytes())
    old_secret = pki["server"][1].read_bytes()
    in_use = keys.load_public(old_public).decode()
    proc, log, control = _curve_control_daemon(pki, tmp_path)

    def warnings() -> list[dict]:
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [e for e in events if e.get("event") == "server_key_changed"]

    try:
        assert _ctl(pki, control, "reload").returncode == 0  # the key on disk is the one in use: nothing to say
        assert warnings() == []
        for path in pki["server"]:
            path.unlink()
        new_public, _ = keys.generate(pki["server"][0].parent, "server")  # a new pair, at the same paths
        proc.send_signal(signal.SIGHUP)  # systemctl reload
        deadline = time.monotonic() + 30
        while not warnings():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        (warned,) = warnings()
        assert warned["level"] == "warning" and warned["domain"] == "control", warned
        assert warned["key_file"] == str(pki["server"][1]) and warned["public_key_in_use"] == in_use
        assert warned["public_key_on_disk"] == keys.load_public(new_public).decode() != in_use
        assert "restart the daemon to serve with the new key" in warned["effect"]
        # Not switched: a client given the old public key is answered, one given the new one is not.
        with ControlClient(control, timeout_s=5, curve=curve_client(old_public, pki["allowed"][1])) as client:
            assert client.request({"cmd": "status"})["ok"]
        with (
            ControlClient(control, timeout_s=5, curve=curve_client(new_public, pki["allowed"][1])) as client,
            pytest.raises(InspectdError, match="not its public key"),
        ):
            client.request({"cmd": "status"})

        # The operator who reloads is told too, not only the journal: `ctl reload` said "unchanged", exit 0.
        on_disk = keys.load_public(new_public).decode()
        rotated = _ctl(pki, control, "reload", server_key=old_public)
        assert (rotated.returncode, rotated.stderr) == (
            1,
            f"inspectd ctl: reload: control: the server key file {pki['server'][1]} now holds another key "
            f"({on_disk}); still serving with the key loaded at start ({in_use}), restart the daemon to serve the "
            "new one\n",
        ), rotated
        assert "allow-list control: unchanged" in rotated.stdout.splitlines(), rotated
        assert len(warnings()) == 2

        pki["server"][1].unlink()  # a key file now refused: said so, and the reload goes on
        gone = _ctl(pki, control, "reload", server_key=old_public)
        assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone
        assert gone.stderr.startswith("inspectd ctl: reload: control: the server key file is now refused: "), gone
        assert str(pki["server"][1]) in gone.stderr and "refuse to start until the file is fixed" in gone.stderr
        assert len(warnings()) == 3 and str(pki["server"][1]) in warnings()[2]["error"], warnings()
        assert "refuse to start" in warnings()[2]["effect"]

        pki["server"][1].write_bytes(old_secret)  # the pair in use put back: nothing more to say
        pki["server"][1].chmod(0o600)
        pki["server"][0].write_bytes(old_public.read_bytes())
        restored = _ctl(pki, control, "reload")
        assert (restored.returncode, restored.stderr) == (0, ""), restored
        assert len(warnings()) == 3
    finally:
        assert _stop(proc) == 0


def test_a_reason_known_for_an_outage_is_not_replaced_by_a_later_socket_hanging_up_without_one():
    """Each socket a long-lived client (a PLC bridge) opens in place of a refused one may first hear the peer hang up
    without a reason, then why (no CurveZMQ there): the reason known flipped to the vaguer one and back at every
    reopen, and the bridge logged both each time (about 240 warnings an hour) where one report per outage is meant.
    The watches stand in for HandshakeWatch as the bridge's reopens leave it between two looks."""
    vague = "ended the CurveZMQ handshake without a reason: ..."
    why = "does not use CurveZMQ there, expected no --server-key/--client-key"

    def watch(failure: str | None, definitive: bool, admitted: bool = False) -> types.SimpleNamespace:
        return types.SimpleNamespace(failure=lambda: failure, definitive=definitive, admitted=admitted, ended=True)

    readmission = keys.Readmission(first_s=0.0, most_s=0.0)
    known = []
    for _ in range(3):  # three sockets, each vague first, then the reason
        for seen in (watch(vague, False), watch(why, True)):
            readmission.look(seen)
            if not known or known[-1] != readmission.failure:
                known.append(readmission.failure)
    assert known == [vague, why], known
    readmission.look(watch(None, False, admitted=True))  # let in: the outage is over
    assert readmission.failure is None
    readmission.look(watch(vague, False))
    assert readmission.failure == vague, "a new outage starts with what is known of it"
