"""`inspectd ctl` as a subprocess against a real daemon: what it prints, what it does to the line, its exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import Station
from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import GRAPH
from engines.bundle.store import load_bundle
from ports import free_port
from station_model import defect_frame, drop, good_frame, result_for, write_grey_bundle
from test_security import PLAIN_REFUSED

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


def ctl(endpoint: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "ctl", "--endpoint", endpoint, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def ctl_status_of(reply: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """`inspectd ctl status` against a real control server whose status is `reply`."""
    from inspectd.daemon.control import ControlServer

    class Handler:
        def status(self):
            return reply

    server = ControlServer(f"ipc://{tmp_path}/control.sock", Handler())
    server.start()
    try:
        return ctl(server.endpoint, "status")
    finally:
        server.stop()


def test_status_pause_resume_thresholds_rollback_and_reload(tmp_path):
    bundle = write_grey_bundle(tmp_path / "bundle")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cameras = [
        {"id": "cam0", "source": {"kind": "folder", "path": str(inbox), "poll_ms": 20}},
        {"id": "cam1", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}},
    ]
    s = Station(tmp_path, bundle, cameras)
    ep = s.control_endpoint
    try:
        s.wait_ready()
        status = ctl(ep, "status")
        assert status.returncode == 0, status.stderr
        assert "station t1: healthy" in status.stdout and "thresholds version 1" in status.stdout
        assert "cam0" in status.stdout and "cam1" in status.stdout
        doc = json.loads(ctl(ep, "--json", "status").stdout)
        assert doc["ok"] and doc["thresholds_version"] == 1 and set(doc["cameras"]) == {"cam0", "cam1"}

        paused = ctl(ep, "pause", "cam0")
        assert paused.returncode == 0 and paused.stdout.strip() == "camera cam0: paused"
        assert json.loads(ctl(ep, "--json", "status").stdout)["cameras"]["cam0"]["state"] == "paused"
        drop(inbox, "000.png", defect_frame(0))
        resumed = ctl(ep, "resume", "cam0")
        assert resumed.returncode == 0 and resumed.stdout.strip() == "camera cam0: running"
        first = result_for(s, "000.png")
        assert first.verdict == "defect" and first.thresholds_version == 1

        # A stricter image threshold as version 2: the same frame is now ok.
        v2 = tmp_path / "thresholds-v2.json"
        v1 = load_bundle(bundle).thresholds()
        v2.write_bytes(thresholds_doc.dumps(thresholds_doc.next_version(v1, image_threshold=0.99)))  # as calibrate
        applied = ctl(ep, "set-thresholds", str(v2))
        assert applied.returncode == 0 and applied.stdout.strip() == "thresholds version 2 in use", applied.stderr
        drop(inbox, "001.png", defect_frame(0))
        second = result_for(s, "001.png")
        assert (second.verdict, second.thresholds_version) == ("ok", 2)

        # Rolling back to 1 is version 3 with version 1's values: the frame is a defect again.
        rolled = ctl(ep, "--json", "rollback", "1")
        assert rolled.returncode == 0, rolled.stderr
        assert json.loads(rolled.stdout) == {"ok": True, "thresholds_version": 3, "rolled_back_to": 1}
        drop(inbox, "002.png", defect_frame(0))
        third = result_for(s, "002.png")
        assert (third.verdict, third.thresholds_version, third.threshold) == ("defect", 3, 0.5)

        reloaded = ctl(ep, "reload")
        assert reloaded.returncode == 0 and "thresholds version 3" in reloaded.stdout, reloaded.stderr

        # A bundle the reload cannot open is refused with bundle_refused: the daemon's next start would refuse it
        # too (teach --apply switches back on it, and only on it); the running model stays.
        graph = bundle / GRAPH
        intact = graph.read_bytes()
        graph.write_bytes(intact + b"\0")
        broken = ctl(ep, "--json", "reload")
        refused = json.loads(broken.stdout)
        assert broken.returncode == 1 and refused["ok"] is False and refused["bundle_refused"] is True, refused
        assert "sha256" in refused["error"], refused
        graph.write_bytes(intact)

        # Refusals: exit 1 with the daemon's one-line reason.
        unknown = ctl(ep, "--json", "pause", "cam9")
        said = json.loads(unknown.stdout)
        assert unknown.returncode == 1 and said["error"].startswith("camera 'cam9': unknown"), said
        assert set(said) == {"ok", "error"}, said  # bundle_refused is reload's, for its bundle alone
        no_version = ctl(ep, "rollback", "7")
        assert no_version.returncode == 1 and "no version 7 in history" in no_version.stderr
        stale = ctl(ep, "--json", "set-thresholds", str(v2))
        assert stale.returncode == 1 and json.loads(stale.stdout)["ok"] is False
        drop(inbox, "003.png", good_frame(3))
        assert result_for(s, "003.png").verdict == "ok", "still steering"
        assert s.stop() == 0, s.log_tail()
    finally:
        s.close()


def test_exit_codes_without_a_daemon(tmp_path):
    gone = ctl(f"ipc://{tmp_path}/nobody.sock", "--timeout", "0.5", "status")
    assert gone.returncode == 3 and "no reply within 0.5 s to 'status', expected a running inspectd" in gone.stderr
    never = ctl(f"ipc://{tmp_path}/nobody.sock", "--timeout", "0.5", "reload")
    assert never.returncode == 3 and "to 'reload', expected a running inspectd" in never.stderr, never.stderr
    network = ctl("tcp://192.0.2.1:5557", "status")
    assert network.returncode == 2 and "expected --server-key and --client-key" in network.stderr
    unreadable = ctl(f"ipc://{tmp_path}/nobody.sock", "set-thresholds", str(tmp_path / "missing.json"))
    assert unreadable.returncode == 2 and "cannot read a thresholds document" in unreadable.stderr
    usage = ctl(f"ipc://{tmp_path}/nobody.sock", "pause")
    assert usage.returncode == 2
    # Input errors are usage errors (2, one line), never a traceback or 1 ("the daemon refused").
    for endpoint, extra, expected in (
        ("foo", (), "--endpoint (or $INSPECTD_CONTROL): expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)"),
        ("tcp://127.0.0.1", (), "expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535"),
        # libzmq cuts the port to 16 bits: the whole timeout was waited out on port 34463, then told as no daemon.
        ("tcp://127.0.0.1:99999", (), "expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535"),
        # A bind's wildcards: the message offered * as a port, and libzmq then refused it as an "Invalid argument";
        # port 0 was waited on for the whole timeout.
        ("tcp://127.0.0.1:*", (), "a number from 1 to 65535 (* and 0 are only for a bind), got 'tcp://127.0.0.1:*'"),
        ("tcp://127.0.0.1:0", (), "a number from 1 to 65535 (* and 0 are only for a bind), got 'tcp://127.0.0.1:0'"),
        ("tcp://*:5557", (), "expected tcp://HOST:PORT, HOST the daemon's address (* is only for a bind), got"),
        (f"ipc://{tmp_path}/nobody.sock", ("--timeout", "nan"), "--timeout nan: expected a finite number"),
        (f"ipc://{tmp_path}/nobody.sock", ("--timeout", "inf"), "--timeout inf: expected a finite number"),
        (f"ipc://{tmp_path}/nobody.sock", ("--timeout", "-1"), "--timeout -1.0: expected a finite number"),
        (f"ipc://{tmp_path}/nobody.sock", ("--timeout", "0"), "--timeout 0.0: expected a finite number"),
        (f"ipc://{tmp_path}/nobody.sock", ("--server-key", "s.key"), "expected both (CurveZMQ) or neither"),
    ):
        bad = ctl(endpoint, *extra, "status", timeout=20)
        assert bad.returncode == 2 and expected in bad.stderr, (endpoint, extra, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_ctls_options_work_after_the_action_and_an_empty_endpoint_variable_is_unset(tmp_path):
    """`ctl status --json` was refused with inspectd's top-level usage ("unrecognized arguments"), and
    INSPECTD_CONTROL set but empty was the endpoint ''."""
    socket = f"ipc://{tmp_path}/nobody.sock"
    after = subprocess.run(
        [sys.executable, "-m", "inspectd", "ctl", "status", "--json", "--endpoint", socket, "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert after.returncode == 3 and f"control {socket}: no reply within 0.5 s" in after.stderr, after.stderr
    # Before the action and after it: the one after wins.
    both = ctl("tcp://127.0.0.1:99999", "status", "--endpoint", socket, "--timeout", "0.5", timeout=30)
    assert both.returncode == 3 and f"control {socket}:" in both.stderr, both.stderr
    empty = subprocess.run(
        [sys.executable, "-m", "inspectd", "ctl", "status", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "INSPECTD_CONTROL": ""},
    )
    assert empty.returncode == 3 and "control ipc:///var/lib/inspectd/control.sock:" in empty.stderr, empty.stderr
    # At the default, the daemon asked for may be one whose state_dir is elsewhere: the line says how to name it.
    assert empty.stderr.rstrip().endswith("(another daemon: --endpoint EP or $INSPECTD_CONTROL)"), empty.stderr
    assert "another daemon" not in after.stderr, "an endpoint given is the one meant"


def test_ctl_pointed_at_another_socket_kind_or_a_left_socket_file_says_which_in_one_line(tmp_path):
    """The daemon's publish endpoint given for its control one, a socket file a stopped daemon left, and a port
    nothing listens on each get a line that says what was found there, not only "expected a running inspectd"; the
    first at once, since libzmq gives such a peer up."""
    import socket
    import time

    import zmq

    publish = zmq.Context.instance().socket(zmq.PUB)
    publish.linger = 0
    port = free_port()
    publish.bind(f"tcp://127.0.0.1:{port}")
    try:
        started = time.monotonic()
        wrong = ctl(f"tcp://127.0.0.1:{port}", "--timeout", "20", "status")
        took = time.monotonic() - started
    finally:
        publish.close()
    assert wrong.returncode == 3 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    # Which side reads the other's kind first is a race: this side (libzmq gives the peer up, no event) or the
    # peer (it hangs up, a failure without detail, each retry alike). Either line names the endpoint expected.
    assert "not another of its sockets" in wrong.stderr, wrong.stderr
    assert "its control endpoint (control.endpoint)" in wrong.stderr and took < 15, (took, wrong.stderr)

    left = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(left))  # a socket file with nothing listening on it, as a killed daemon leaves
    stale.close()
    gone = ctl(f"ipc://{left}", "--timeout", "1", "status")
    assert gone.returncode == 3 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    assert f"the socket file {left} is there but every connection to it was refused" in gone.stderr, gone.stderr

    closed = ctl(f"tcp://127.0.0.1:{free_port()}", "--timeout", "1", "status")
    assert closed.returncode == 3 and "every connection was refused, so nothing listens there" in closed.stderr


def test_another_socket_kind_is_told_at_once_after_an_earlier_connection_was_cut_mid_greeting():
    """A busy peer of another kind may close a connection before this side reads its greeting: a failed handshake
    without detail, which libzmq retries. The next connection's close (this side finding the kind, no event, no
    retry) was then read as explained by that old failure, and ctl waited out its whole timeout. A relay that cuts
    the first connection and passes the rest to a PUB socket makes that order every time."""
    import socket
    import threading
    import time

    import zmq

    publish = zmq.Context.instance().socket(zmq.PUB)
    publish.linger = 0
    target = free_port()
    publish.bind(f"tcp://127.0.0.1:{target}")
    relay = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = relay.accept()
                accepted.append(conn)
                if len(accepted) == 1:
                    conn.close()  # cut before any greeting
                    continue
                upstream = socket.create_connection(("127.0.0.1", target))
                threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        started = time.monotonic()
        wrong = ctl(f"tcp://127.0.0.1:{relay.getsockname()[1]}", "--timeout", "20", "status")
        took = time.monotonic() - started
    finally:
        relay.close()
        publish.close()
    assert len(accepted) >= 2, "the relay never passed a connection on"
    assert wrong.returncode == 3 and "not another of its sockets" in wrong.stderr, wrong.stderr
    assert took < 15, (took, wrong.stderr)


def test_a_thresholds_file_ctl_cannot_send_is_one_line_and_exit_2_with_nothing_sent(tmp_path):
    """Parsed as the daemon parses it (deep nesting, a 5000-digit integer, NaN: each one line, never a traceback),
    and refused before sending when over the daemon's request limit, which the daemon's socket drops unanswered."""
    import zmq

    from inspectd.protocol.control import MAX_REQUEST_BYTES

    # A file of exactly the limit (ctl reads no further), whose request is over it.
    pad = "x" * (MAX_REQUEST_BYTES - len(json.dumps({"version": 2, "pad": ""}, separators=(",", ":"))))
    sent = len(json.dumps({"cmd": "set_thresholds", "thresholds": {"version": 2, "pad": pad}}).encode())
    files = {
        "deep.json": ("[" * 100000 + "]" * 100000, "deep.json: not JSON (nested too deeply), expected a thresholds"),
        "bigint.json": ('{"version": ' + "9" * 5000 + "}", "bigint.json: not JSON (an integer of 5000 digits"),
        "nan.json": ('{"version": 2, "image_threshold": NaN}', "nan.json: not JSON (NaN, expected a finite number)"),
        "dup.json": ('{"version": 2, "version": 3}', "dup.json: key 'version' given twice in one object"),
        "big.json": (
            json.dumps({"version": 2, "pad": pad}, separators=(",", ":")),
            f"'set_thresholds': request of {sent} bytes, expected at most 1 MiB",
        ),
    }
    endpoint = f"ipc://{tmp_path}/control.sock"
    daemon = zmq.Context.instance().socket(zmq.REP)  # a daemon's socket, to see that nothing reaches it
    daemon.linger = 0
    daemon.bind(endpoint)
    try:
        for name, (text, expected) in files.items():
            (tmp_path / name).write_text(text)
            bad = ctl(endpoint, "--timeout", "3", "set-thresholds", str(tmp_path / name))
            assert bad.returncode == 2 and expected in bad.stderr, (name, bad.returncode, bad.stderr[-500:])
            assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
        assert not daemon.poll(500), "a request ctl refused reached the daemon"
    finally:
        daemon.close()


def test_a_socket_file_this_user_may_not_connect_to_is_told_apart_from_no_daemon(tmp_path):
    """ZeroMQ retries an ipc connect the file's mode refuses without a word: ctl says what the socket file tells
    instead of blaming a daemon that is running. Root passes every mode check, so as root ctl runs without the
    capabilities that let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), which is what a user outside the group lacks."""
    import grp
    import os

    from inspectd.daemon.control import ControlServer

    gone = ctl(f"ipc://{tmp_path}/nobody.sock", "--timeout", "0.5", "status")
    assert gone.returncode == 3, gone.stderr
    assert gone.stderr.strip() == (
        f"inspectd ctl: control ipc://{tmp_path}/nobody.sock: no reply within 0.5 s to 'status', expected a running "
        f"inspectd: no socket file {tmp_path}/nobody.sock, so no daemon is bound there"
    )

    class Handler:
        def status(self) -> dict:
            return {"healthy": True}

    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to run ctl without root's override of file modes")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    server = ControlServer(f"ipc://{tmp_path}/run/control.sock", Handler())
    server.start()
    try:
        path = server.endpoint[len("ipc://") :]
        os.chmod(path, 0)
        shut_out = subprocess.run(
            [*prefix, sys.executable, "-m", "inspectd", "ctl", "--endpoint", server.endpoint, "--timeout", "0.5",
             "status"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        group = grp.getgrgid(os.stat(path).st_gid).gr_name
        assert shut_out.returncode == 3, shut_out.stderr
        assert shut_out.stderr.strip() == (
            f"inspectd ctl: control {server.endpoint}: no reply within 0.5 s to 'status': the socket file {path} "
            f"exists but this user may not connect to it (mode 0000, group {group}): run as its owner or a member of "
            f"group {group}"
        )
        assert server.requests == 0
        os.chmod(path, 0o660)
        assert ctl(server.endpoint, "status").returncode == 0, "the daemon was there all along"
    finally:
        server.stop()


def test_ctl_over_tcp_with_curve_keys(tmp_path):
    from inspectd.protocol import keys

    server_public, server_secret = keys.generate(tmp_path / "keys" / "server", "server")
    operator_public, operator_secret = keys.generate(tmp_path / "keys" / "operator", "operator")
    intruder_secret = keys.generate(tmp_path / "keys" / "intruder", "intruder")[1]
    allow = tmp_path / "keys" / "allowed"
    allow.mkdir(mode=0o755)
    allow.chmod(0o755)
    (allow / "operator.key").write_bytes(operator_public.read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cameras = [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}]
    curve = {"server_secret_key": str(server_secret), "allowed_clients_dir": str(allow)}
    s = Station(
        tmp_path, write_grey_bundle(tmp_path / "bundle"), cameras, control={"endpoint": endpoint, "curve": curve}
    )
    try:
        s.wait_ready()
        keyed = ("--server-key", str(server_public), "--client-key")
        ok = ctl(endpoint, *keyed, str(operator_secret), "pause", "cam0")
        assert ok.returncode == 0 and ok.stdout.strip() == "camera cam0: paused", ok.stderr
        # Not in the allow-list, the wrong server key, or no keys at all: the daemon ends the handshake, and ctl says
        # why in one line (exit 3: no daemon took the request), where it used to say only that none answered.
        intruder = ctl(endpoint, *keyed, str(intruder_secret), "--timeout", "1", "resume", "cam0")
        assert intruder.returncode == 3 and "refused this client's key" in intruder.stderr, intruder.stderr
        wrong = ("--server-key", str(operator_public), "--client-key", str(operator_secret))
        mistaken = ctl(endpoint, *wrong, "--timeout", "1", "resume", "cam0")
        assert mistaken.returncode == 3 and "a --server-key that is not its public key" in mistaken.stderr
        bare = ctl(endpoint, "--timeout", "1", "resume", "cam0")
        # The mismatch is named when the client reads the daemon's greeting before the daemon hangs up.
        assert bare.returncode == 3 and re.search(PLAIN_REFUSED, bare.stderr), bare.stderr
        assert len((intruder.stderr + mistaken.stderr + bare.stderr).strip().splitlines()) == 3
        nobody = ctl(f"tcp://127.0.0.1:{free_port()}", *keyed, str(operator_secret), "--timeout", "1", "status")
        assert nobody.returncode == 3 and "no reply within 1 s" in nobody.stderr
        status = json.loads(ctl(endpoint, *keyed, str(operator_secret), "--json", "status").stdout)
        assert status["cameras"]["cam0"]["state"] == "paused", "neither refused request reached the daemon"

        # A reload whose allow-list fails its checks keeps the old list: ctl says so and exits 1, not 0.
        loose = allow / "colleague.key"
        loose.write_bytes(intruder_secret.with_suffix(".key").read_bytes())
        loose.chmod(0o664)
        failed = ctl(endpoint, *keyed, str(operator_secret), "reload")
        assert failed.returncode == 1, (failed.stdout, failed.stderr)
        assert "reloaded: model" in failed.stdout and "allow-list control: NOT reloaded" in failed.stdout
        assert "allow-list control not reloaded, the previous one stays" in failed.stderr
        assert "colleague.key: mode 0664" in failed.stderr
        failed_json = ctl(endpoint, *keyed, str(operator_secret), "--json", "reload")
        assert failed_json.returncode == 1 and "error" in json.loads(failed_json.stdout)["allow_lists"]["control"]
        loose.chmod(0o644)
        fixed = ctl(endpoint, *keyed, str(operator_secret), "reload")
        assert fixed.returncode == 0, fixed.stderr
        assert "allow-list control: added colleague.key (" in fixed.stdout
        # Revoking the colleague by deleting its file while a copy under another name keeps its key in: said, not
        # "unchanged".
        (allow / "colleague-old.key").write_bytes(loose.read_bytes())
        (allow / "colleague-old.key").chmod(0o644)
        loose.unlink()
        kept = ctl(endpoint, *keyed, str(operator_secret), "reload")
        assert kept.returncode == 0, kept.stderr
        said = [line for line in kept.stdout.splitlines() if line.startswith("allow-list control: ")]
        assert len(said) == 1 and said[0].startswith("allow-list control: deleted colleague.key ("), kept.stdout
        assert said[0].endswith("): still allowed, the same key is in colleague-old.key"), said
        assert s.stop() == 0, s.log_tail()
    finally:
        s.close()


def test_set_thresholds_outside_the_scores_seen_at_calibration_is_refused_unless_forced(tmp_path):
    """`inspectd calibrate` records the scores it saw; a daemon holding that document refuses a threshold outside
    them (widened by their width each side) before anything is written, and takes it with --force."""
    import cv2

    from station_model import defect_frame, good_frame

    bundle = write_grey_bundle(tmp_path / "bundle")
    good, bad = tmp_path / "good", tmp_path / "defective"
    defective = str(bad)
    good.mkdir()
    bad.mkdir()
    for i in range(40):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(100 + i))
    for i in range(10):
        cv2.imwrite(str(bad / f"{i:03d}.png"), defect_frame(200 + i))
    calibrated = subprocess.run(
        [sys.executable, "-m", "inspectd", "calibrate", str(bundle), "--good", str(good), "--defective", defective],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert calibrated.returncode == 0, calibrated.stderr
    v2 = load_bundle(bundle).thresholds()
    seen = v2.provenance[thresholds_doc.IMAGE_SCORES]
    assert v2.version == 2 and seen["n"] == 50
    lo, hi = seen["min"], seen["max"]
    width = hi - lo
    # Outside the scores seen, yet inside what the versions' thresholds widened 10x would allow.
    far = hi + 2 * width
    versions = [v2.image_threshold, *(h["image_threshold"] for h in v2.history)]
    assert far < max(versions) + max(map(abs, versions)) * 9, "the value must be one a span-of-versions rule accepts"

    def document(version: int, image_threshold: float) -> Path:
        path = tmp_path / f"thresholds-v{version}.json"
        path.write_bytes(thresholds_doc.dumps(thresholds_doc.next_version(v2, image_threshold=image_threshold)))
        doc = json.loads(path.read_text())
        doc["version"] = version
        path.write_text(json.dumps(doc))
        return path

    on_disk = bundle / thresholds_doc.FILE_NAME
    cameras = [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}]
    s = Station(tmp_path, bundle, cameras)
    ep = s.control_endpoint
    try:
        s.wait_ready()
        before = on_disk.read_bytes()
        refused = ctl(ep, "set-thresholds", str(document(3, far)))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        reason = refused.stderr.strip()
        assert f"thresholds.image_threshold: {far:g} is outside {lo - width:g}..{hi + width:g}" in reason, reason
        assert "scores seen at calibration" in reason and "force" in reason and "\n" not in reason
        assert on_disk.read_bytes() == before, "a refused document must not reach thresholds.json"
        assert json.loads(ctl(ep, "--json", "status").stdout)["thresholds_version"] == 2

        low = ctl(ep, "set-thresholds", str(document(3, lo - 2 * width)))  # below every good score: rejects all
        assert low.returncode == 1 and "is outside" in low.stderr, low.stderr

        # Calibrated on another model, or overriding a camera this daemon does not run: refused unless forced.
        for change, expected in (
            ({"provenance": {**v2.provenance, "model_id": "frozen-lite0-00000000"}}, "provenance.model_id"),
            ({"per_camera": {"cam9": {"image_threshold": hi}}}, "per_camera: cam9: not a camera of this daemon"),
        ):
            stranger = document(3, hi)
            stranger.write_text(json.dumps({**json.loads(stranger.read_text()), **change}))
            foreign = ctl(ep, "set-thresholds", str(stranger))
            assert foreign.returncode == 1 and f"thresholds.{expected}" in foreign.stderr, foreign.stderr
            assert on_disk.read_bytes() == before

        inside = ctl(ep, "set-thresholds", str(document(3, hi + 0.5 * width)))
        assert inside.returncode == 0, inside.stderr
        forced = ctl(ep, "set-thresholds", "--force", str(document(4, far)))
        assert forced.returncode == 0 and forced.stdout.strip() == "thresholds version 4 in use", forced.stderr
        written = thresholds_doc.read(on_disk)
        assert (written.version, written.image_threshold) == (4, far)
        assert s.stop() == 0, s.log_tail()
    finally:
        s.close()
    forced_events = [e for e in s.events("control_command") if e.get("cmd") == "set_thresholds"]
    assert [e.get("force") for e in forced_events][-1] is True


def test_status_text_shows_every_alarm_last_errors_and_auth_refusals(tmp_path):
    """What `ctl status` prints agrees with the web view: a drift alarm, a false-reject warning, a camera's last
    error and CurveZMQ refusals are on the human output, not only in --json."""

    reply = {
        "station": "line1", "healthy": True, "uptime_s": 3600, "throughput_fps": 9.8, "published": 35000,
        "model_id": "m1", "thresholds_version": 3, "last_error": None, "auth_refused": {"control": 312, "publish": 0},
        "journal": {"degraded": False}, "archive": {"degraded": True, "error": "OSError: disk full", "lost": 4},
        "cameras": {
            "cam0": {"state": "reopening", "frames_in": 100, "published": 100, "last_error": "folder /srv/cam0 is gone",
                     "drift": {"alarm": True, "score_alarm": True, "statistic": 0.5, "raise_at": 0.4}},
            "cam1": {"state": "running", "frames_in": 7, "published": 7, "last_error": None,
                     "drift": {"alarm": False, "false_reject_warning": True, "false_reject_estimate": 0.02,
                               "target": 0.001}},
        },
    }  # fmt: skip

    out = ctl_status_of(reply, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "last error: folder /srv/cam0 is gone" in lines[3], out.stdout
    assert "CurveZMQ attempts refused since start: control 312" in out.stdout and "publish 0" not in out.stdout
    assert [line for line in lines if line.startswith("ALARM ")] == [
        "ALARM archive degraded: OSError: disk full (4 lost)",
        "ALARM camera cam0 reopening: folder /srv/cam0 is gone",
        "ALARM camera cam0 drift: good parts no longer score as at calibration (KS D 0.5 > 0.4; lighting, lens, "
        "focus or material?)",
        "ALARM camera cam1 false rejects rising: about 2 % of good parts, target 0.1 %",
    ]


def test_status_text_says_what_a_holding_drift_alarm_waits_for_and_which_drift_watches_are_off(tmp_path):
    """Statuses of real drift monitors through `ctl status`: an alarm holding through its hysteresis (D back under
    raise_at) shows the level D must fall below to clear, not a comparison that is false; a camera whose drift alarm
    cannot rise (reference too small, no brightness reference) says so under its line, with the reason; one whose
    score test is off but brightness test watches, and one whose false-reject warning is not armed, say that."""
    import numpy as np

    from inspectd.daemon.drift import DriftMonitor
    from test_drift import in_hysteresis

    rng = np.random.default_rng(3)
    brightness = (100, sorted(rng.normal(128.0, 2.0, 100).tolist()))
    few = sorted(rng.normal(1.0, 0.1, 20).tolist())
    drift = {
        "cam0": in_hysteresis(brightness=False),
        "cam1": in_hysteresis(brightness=True),
        "cam2": DriftMonitor((3, [1.0, 1.1, 1.2]), 2.0).status(),
        "cam3": DriftMonitor((3, [1.0, 1.1, 1.2]), 2.0, brightness_reference=brightness).status(),
        "cam4": DriftMonitor((20, few), max(few) * 1.01).status(),
    }
    reply = {
        "station": "line1", "healthy": True, "model_id": "m1", "thresholds_version": 3,
        "cameras": {camera: {"state": "running", "drift": d} for camera, d in drift.items()},
    }  # fmt: skip

    out = ctl_status_of(reply, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    holding = [line for line in lines if line.startswith("ALARM ")]
    score, light = drift["cam0"], drift["cam1"]
    assert holding == [
        f"ALARM camera cam0 drift: good parts no longer score as at calibration (KS D {score['statistic']}, clears "
        f"below {score['clear_at']}; lighting, lens, focus or material?)",
        f"ALARM camera cam1 drift: good parts no longer look as bright as at calibration (KS D "
        f"{light['brightness_statistic']}, clears below {light['brightness_clear_at']}; lighting, lens, focus or "
        "material?)",
    ], out.stdout
    indent = " " * 15  # under the camera id's column
    off = [
        f"{indent}drift alarm off: {drift['cam2']['inactive_reason']}",
        f"{indent}drift score test off (the brightness test still watches): {drift['cam3']['inactive_reason']}",
        f"{indent}false-reject warning off: {drift['cam4']['false_reject_warning_inactive_reason']}",
    ]
    assert [line for line in lines if line.strip().startswith(("drift", "false-reject"))] == off, out.stdout
    for camera, line in zip(("cam2", "cam3", "cam4"), off, strict=True):
        assert lines[lines.index(line) - 1].startswith(f"  {camera} "), f"not under {camera}: {out.stdout}"
    assert "expected at least 8" in drift["cam2"]["inactive_reason"]


def test_an_unanswered_write_may_still_apply_and_an_overlong_rollback_version_is_never_sent(tmp_path):
    """A set-thresholds or rollback the daemon took but did not answer in time may still be applied: the line says to
    check status before sending it again (not to look for a reload). A rollback version longer than the daemon's
    parser takes is a usage error (exit 2) and never sent, not the daemon's "request: not JSON" refusal (exit 1)."""
    import zmq

    endpoint = f"ipc://{tmp_path}/control.sock"
    daemon = zmq.Context.instance().socket(zmq.REP)  # takes requests and answers none: a daemon still at one
    daemon.linger = 0
    daemon.bind(endpoint)
    document = tmp_path / "v2.json"
    document.write_text('{"version": 2}')
    try:
        typo = ctl(endpoint, "--timeout", "3", "rollback", "1" * 22)
        assert typo.returncode == 2, typo.stderr
        assert typo.stderr.strip() == (
            "inspectd ctl: rollback VERSION: an integer of 22 digits, expected an earlier thresholds version "
            "(at most 20 digits)"
        )
        assert not daemon.poll(300), "a request ctl refused reached the daemon"
        for args, cmd in ((("rollback", "1"), "rollback"), (("set-thresholds", str(document)), "set_thresholds")):
            unanswered = ctl(endpoint, "--timeout", "1", *args)
            said = unanswered.stderr.strip()
            assert unanswered.returncode == 3 and "\n" not in said, said
            assert f"no reply within 1 s to {cmd!r}, which the daemon took and may still apply" in said, said
            assert "check `inspectd ctl status` (its thresholds version) before sending it again" in said, said
            assert "busy with a reload" not in said, said
        assert daemon.poll(3000) and json.loads(daemon.recv()) == {"cmd": "rollback", "version": 1}
    finally:
        daemon.close()


def test_set_thresholds_while_another_writer_holds_the_bundle_is_refused_at_once_and_status_answers(tmp_path):
    """Another writer (build-engine, teach, calibrate) holds the bundle's write lock, taken as engines.bundle.store
    takes it: set-thresholds is refused in one line well within ctl's timeout, nothing written, and another
    operator's status sent meanwhile answers (the control thread answers one request at a time, so a writer's 30 s
    wait there held every client and let the write land after ctl had given up). Once the lock is free the same
    request is applied."""
    import time

    bundle = write_grey_bundle(tmp_path / "bundle")
    cameras = [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}]
    s = Station(tmp_path, bundle, cameras)
    ep = s.control_endpoint
    v2 = tmp_path / "thresholds-v2.json"
    v2.write_bytes(
        thresholds_doc.dumps(thresholds_doc.next_version(load_bundle(bundle).thresholds(), image_threshold=0.9))
    )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(bundle.resolve()),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        s.wait_ready()
        assert holder.stdout.readline() == "held\n"
        writer = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "ctl", "--endpoint", ep, "--timeout", "8", "set-thresholds", str(v2)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        deadline = time.monotonic() + 20
        while not any(e.get("cmd") == "set_thresholds" for e in s.events("control_command")):
            assert time.monotonic() < deadline and writer.poll() is None, s.log_tail()
            time.sleep(0.05)
        status = ctl(ep, "--timeout", "8", "status")  # queued behind the write, answered once it is refused
        assert status.returncode == 0 and "thresholds version 1" in status.stdout, status.stderr
        _, err = writer.communicate(timeout=30)
        assert writer.returncode == 1, err
        assert len(err.strip().splitlines()) == 1, err
        assert "another process is writing into this bundle (build-engine, teach, calibrate), still after 2 s" in err
        assert "thresholds.json not written; retry" in err, err
        assert load_bundle(bundle).thresholds().version == 1 and not s.events("thresholds_set")

        holder.stdin.close()
        holder.wait(timeout=10)
        applied = ctl(ep, "set-thresholds", str(v2))
        assert applied.returncode == 0 and applied.stdout.strip() == "thresholds version 2 in use", applied.stderr
        assert load_bundle(bundle).thresholds().version == 2
        assert s.stop() == 0, s.log_tail()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        s.close()


def test_a_reload_slower_than_the_timeout_is_said_to_be_under_way_not_a_missing_daemon(tmp_path):
    """A reload that outlasts --timeout (here its bundle's manifest is on storage that answers only when the test
    lets it: a FIFO) is reported as one the daemon took and may still be running, with where to see how it ends, not
    as no daemon; a status sent meanwhile is said to be queued behind it. Once the manifest arrives the reload
    finishes (`reloaded`) and status answers again."""
    import errno
    import os
    import time

    bundle = write_grey_bundle(tmp_path / "bundle")
    cameras = [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}]
    s = Station(tmp_path, bundle, cameras)
    ep = s.control_endpoint
    manifest = bundle / "manifest.json"
    content = manifest.read_bytes()

    def release(timeout: float) -> None:
        """The manifest as a file again, and its bytes to the reload waiting on the FIFO."""
        deadline = time.monotonic() + timeout
        while True:
            try:  # succeeds only while a reader (the daemon's reload) has the FIFO open
                fd = os.open(tmp_path / "fifo", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                assert exc.errno == errno.ENXIO and time.monotonic() < deadline, f"no reload reading; {s.log_tail()}"
                time.sleep(0.02)
        try:
            (tmp_path / "manifest.tmp").write_bytes(content)
            os.replace(tmp_path / "manifest.tmp", manifest)  # every later read gets the file
            os.write(fd, content)
        finally:
            os.close(fd)

    try:
        s.wait_ready()  # started on the manifest as a file
        slow = tmp_path / "slow-manifest"
        os.mkfifo(slow)
        os.link(slow, tmp_path / "fifo")  # a second name to reach it by once manifest.json is a file again
        os.replace(slow, manifest)
        reload = ctl(ep, "--timeout", "1", "reload")
        assert reload.returncode == 3, reload.stdout + reload.stderr
        said = reload.stderr.strip()
        assert "no reply within 1 s to 'reload', which the daemon took: it may still be reloading" in said, said
        assert "inspectd ctl status" in said and "reloaded or reload_failed" in said and "\n" not in said
        assert "expected a running inspectd" not in said
        queued = ctl(ep, "--timeout", "1", "status")
        assert queued.returncode == 3 and "to 'status', which the daemon took" in queued.stderr, queued.stderr
        assert "busy with a reload" in queued.stderr
        # calibrate --apply meanwhile (on a copy of the same model, whose manifest it can read): the daemon took the
        # version, so calibrate leaves writing it to the daemon, which checks it first; written here too, a version
        # the daemon then refused would stop its next start.
        copy = tmp_path / "copy"
        shutil.copytree(bundle, copy, ignore=lambda _, names: [n for n in names if n == "manifest.json"])
        (copy / "manifest.json").write_bytes(content)
        load_bundle(copy).replace_file(
            thresholds_doc.FILE_NAME,
            thresholds_doc.dumps(thresholds_doc.next_version(load_bundle(copy).thresholds(), image_threshold=0.5)),
        )
        calibrate = subprocess.run(
            [sys.executable, "-m", "inspectd", "calibrate", str(copy), "--rollback", "1", "--apply", ep]
            + ["--timeout", "1"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert calibrate.returncode == 1, calibrate.stdout + calibrate.stderr
        assert "version 3 not written to" in calibrate.stderr and "the daemon writes it when it accepts it" in (
            calibrate.stderr
        )
        assert load_bundle(copy).thresholds().version == 2
        assert s.events("reload_started") and not s.events("reloaded")

        release(10)
        deadline = time.monotonic() + 30
        while not s.events("reloaded"):
            assert time.monotonic() < deadline and not s.events("reload_failed"), s.log_tail()
            time.sleep(0.05)
        while not s.events("thresholds_set"):  # calibrate's version, taken before, checked and written now
            assert time.monotonic() < deadline, s.log_tail()
            time.sleep(0.05)
        assert s.events("thresholds_set")[0]["thresholds_version"] == 3
        assert load_bundle(bundle).thresholds().version == 3
        status = ctl(ep, "status")
        assert status.returncode == 0 and "station t1: healthy" in status.stdout, status.stderr
        assert s.stop() == 0, s.log_tail()
    finally:
        if manifest.is_fifo():
            release(1)
        s.close()


def test_set_thresholds_help_says_what_force_skips():
    """--force skips every check that the document fits the daemon (tests/test_service.py): the help says so."""
    shown = " ".join(ctl("ipc:///nonexistent", "set-thresholds", "--help").stdout.split())
    assert "outside the calibrated score range" in shown
    assert "set on another model (provenance.model_id)" in shown and "cameras it does not run" in shown


def test_a_server_key_that_is_a_named_pipe_is_refused_in_one_line_not_waited_on(tmp_path):
    """Read as a key file, a named pipe held ctl until something wrote to it: a hang with no word of why."""
    from inspectd.protocol.keys import generate

    _, client_secret = generate(tmp_path, "operator")
    fifo = tmp_path / "station.key"
    os.mkfifo(fifo)
    args = ("--server-key", str(fifo), "--client-key", str(client_secret), "--timeout", "0.5", "status")
    refused = ctl(f"ipc://{tmp_path}/nobody.sock", *args, timeout=20)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (
        f"inspectd ctl: server public key {fifo}: not a regular file, expected a key file from `inspectd keys generate`"
    )


def test_a_thresholds_file_that_is_no_regular_file_or_over_the_cap_is_refused_in_one_line_unread(tmp_path):
    """A named pipe blocked ctl past --timeout, and /dev/zero was read whole into memory (a MemoryError traceback
    under a memory limit): what is not a regular file is refused before any read, and a file is read no further than
    the request limit. The children run under a memory limit, so that a whole read cannot take the machine's."""
    import resource

    import zmq

    from inspectd.protocol.control import MAX_REQUEST_BYTES

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    fifo = tmp_path / "thresholds.fifo"
    os.mkfifo(fifo)
    padded = tmp_path / "padded.json"  # under the request limit once parsed, over it as a file
    padded.write_bytes(b'{"version": 2}' + b" " * MAX_REQUEST_BYTES)
    cases = {
        fifo: f"{fifo}: a named pipe, expected a thresholds document (a regular file)",
        Path("/dev/zero"): "/dev/zero: a character device, expected a thresholds document (a regular file)",
        tmp_path: f"{tmp_path}: a directory, expected a thresholds document (a regular file)",
        padded: f"{padded}: a thresholds document of over {MAX_REQUEST_BYTES} bytes, expected at most 1 MiB",
    }
    endpoint = f"ipc://{tmp_path}/control.sock"
    daemon = zmq.Context.instance().socket(zmq.REP)  # a daemon's socket, to see that nothing reaches it
    daemon.linger = 0
    daemon.bind(endpoint)
    try:
        for path, expected in cases.items():
            refused = subprocess.run(
                [sys.executable, "-m", "inspectd", "ctl", "--endpoint", endpoint, "--timeout", "2"]
                + ["set-thresholds", str(path)],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=REPO,
                preexec_fn=limited,
            )
            assert (refused.returncode, refused.stderr) == (2, f"inspectd ctl: {expected}\n"), (path, refused)
        assert not daemon.poll(500), "a file ctl refused reached the daemon"
    finally:
        daemon.close()


@contextlib.contextmanager
def answering(endpoint: str, reply: bytes):
    """A control socket at `endpoint` that answers every request with `reply`; yields the requests it got."""
    import threading

    import zmq

    sock = zmq.Context.instance().socket(zmq.REP)
    sock.linger = 0
    sock.bind(endpoint)
    got: list[dict] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if sock.poll(50):
                got.append(json.loads(sock.recv()))
                sock.send(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_a_write_answered_in_a_reply_ctl_cannot_read_may_have_been_applied_not_refused(tmp_path):
    """A daemon that took a rollback and answered it with a version no client parser reads (21 digits) had applied
    it; ctl said "refused" (exit 1 with the parser's reason only), and the operator sent it again or believed the old
    thresholds still judged. A read (status) with the same reply is still just a reply it cannot read."""
    endpoint = f"ipc://{tmp_path}/control.sock"
    document = tmp_path / "v2.json"
    document.write_text('{"version": 2, "image_threshold": 0.5, "pixel_threshold": 0.5}')
    reply = b'{"ok": true, "thresholds_version": 100000000000000000000}'
    with answering(endpoint, reply) as got:
        for args, action in ((("rollback", "1"), "rollback"), (("set-thresholds", str(document)), "set-thresholds")):
            said = ctl(endpoint, "--timeout", "5", *args)
            line = said.stderr.strip()
            assert said.returncode == 1 and "\n" not in line and said.stdout == "", (said.returncode, said.stderr)
            assert line == (
                f"inspectd ctl: control {endpoint}: reply: not JSON (an integer of 21 digits, expected at most 20), "
                f'expected {{"ok": ...}}: the daemon answered the {action} in a reply ctl cannot read, so it may '
                "have been applied: check `inspectd ctl status` (its thresholds version) before sending it again"
            ), line
        status = ctl(endpoint, "--timeout", "5", "status")
        assert status.returncode == 1 and "may have been applied" not in status.stderr, status.stderr
        assert [request["cmd"] for request in got] == ["rollback", "set_thresholds", "status"]


def test_a_thresholds_file_saved_with_a_byte_order_mark_is_sent_without_it(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark: ctl refused such a file as "not JSON (Expecting value)",
    naming neither the mark nor a position, in a file with no syntax error to find."""
    endpoint = f"ipc://{tmp_path}/control.sock"
    document = tmp_path / "bom.json"
    document.write_bytes(b'\xef\xbb\xbf{"version": 41, "image_threshold": 0.6, "pixel_threshold": 0.5}')
    with answering(endpoint, b'{"ok": true, "thresholds_version": 41}') as got:
        sent = ctl(endpoint, "--timeout", "5", "set-thresholds", str(document))
        assert sent.returncode == 0 and sent.stdout.strip() == "thresholds version 41 in use", sent.stderr
    assert got == [
        {
            "cmd": "set_thresholds",
            "thresholds": {"version": 41, "image_threshold": 0.6, "pixel_threshold": 0.5},
        }
    ]
