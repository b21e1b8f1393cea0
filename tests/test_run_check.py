"""`inspectd run --check` and `inspectd --version` as subprocesses: what an installer or an operator runs before
starting (or restarting) the service."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import yaml

from inspectd.daemon.security import ALLOW_ROOT_ENV
from inspectd.protocol import keys
from ports import free_port
from station_model import write_grey_bundle

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


def inspectd(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ROOT_ENV}  # --check is allowed as root by itself
    if "--check" in args and "--service-user" not in args:
        # These configs lie under pytest's 0700 folders, which no service user reaches: checked as root alone, so a
        # machine that has an inspectd user (a station, an image built with install.sh) passes them as any other.
        args = (*args, "--service-user", "")
    return subprocess.run(
        [sys.executable, "-m", "inspectd", *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=env
    )


def line_config(tmp_path: Path) -> dict:
    """One synthetic camera on the bundle at tmp_path/bundle (relative to the config file, written beside it)."""
    return {
        "station": "line1",
        "model": {"bundle": "bundle"},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
    }


def test_check_validates_the_config_and_its_bundle_without_starting(tmp_path):
    bundle = write_grey_bundle(tmp_path / "bundle")
    config = line_config(tmp_path)
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    ok = inspectd("run", "--check", "--config", str(path))
    assert ok.returncode == 0, ok.stderr
    assert f"{path}: valid" in ok.stdout and "cameras cam0" in ok.stdout and "thresholds version 1" in ok.stdout
    assert (
        "16-bit frames of folder, zmq and opencv cameras narrowed as 16-bit, >> 8 (the bundle declares no "
        "input.bit_depth)"
    ) in ok.stdout
    write_grey_bundle(bundle, bit_depth=12)
    twelve = inspectd("run", "--check", "--config", str(path))
    assert "cameras narrowed as 12-bit, >> 4 (input.bit_depth); genicam cameras' by their pixel format" in twelve.stdout
    assert not (tmp_path / "pub.sock").exists() and not (tmp_path / "state").exists(), "nothing was started"

    path.write_text(yaml.safe_dump({**config, "cameras": [{"id": "cam0", "source": {"kind": "synthetc"}}]}))
    bad_key = inspectd("run", "--check", "--config", str(path))
    assert bad_key.returncode == 2 and "cameras[0].source.kind" in bad_key.stderr

    path.write_text(yaml.safe_dump(config))
    (bundle / "scorer.npz").write_bytes(b"changed")
    tampered = inspectd("run", "--check", "--config", str(path))
    assert tampered.returncode == 2 and "scorer.npz" in tampered.stderr, tampered.stderr


@pytest.mark.parametrize(
    "change, refused",
    [
        ({"publish": {"journal": {"path": "elsewhere/journal"}}}, "publish.journal.path: "),
        ({"archive": {"path": "elsewhere/archive"}}, "archive.path: "),
        ({"engine": {"options": {"precision": "fp16"}}}, "engine.options.precision: 'fp16' but "),
        pytest.param(
            {"engine": {"options": {"providers": "cuda"}}},
            "engine.options.providers: 'cuda' but this onnxruntime ",
            marks=pytest.mark.skipif(
                "CUDAExecutionProvider" in ort.get_available_providers(),
                reason="a GPU build of onnxruntime: cuda is a device question, retried at start",
            ),
        ),
    ],
    ids=["journal-outside-state-dir", "archive-outside-state-dir", "fp16-without-its-graph", "cuda-on-a-cpu-build"],
)
def test_check_refuses_what_run_refuses(tmp_path, change, refused):
    """`--check` is what an operator runs before a restart: a config it calls valid must not be one `run` refuses."""
    write_grey_bundle(tmp_path / "bundle")  # FP32 only: no FP16 graph
    config = line_config(tmp_path)
    for section, value in change.items():
        config[section] = {**config.get(section, {}), **value}
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = inspectd("run", "--check", "--config", str(path))
    assert checked.returncode == 2, checked.stdout
    assert checked.stderr.startswith(f"inspectd run --check: {refused}"), checked.stderr
    assert checked.stderr.count("\n") == 1


def test_version():
    shown = inspectd("--version")
    assert shown.returncode == 0 and shown.stdout.startswith("inspectd ")


def test_a_package_missing_from_the_installation_exits_1_not_as_a_refused_config():
    """Exit 2 is a refused config, which the units do not restart; a package missing (an upgrade caught half-way) is
    exit 1, named, whatever the command line, so systemd starts it again."""
    missing = (
        "import sys; sys.modules['structlog'] = None; from inspectd.cli import main; "
        "sys.exit(main(['run', '--config', '/etc/inspectd/inspectd.yaml']))"
    )
    run = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 1, run.stderr
    said = "inspectd run: needs the Python package 'structlog', which is not installed"
    assert run.stderr.startswith(said), run.stderr
    assert inspectd("run", "--no-such-flag").returncode == 2  # a usage error is still one


def _curve_config(tmp_path: Path, pki) -> dict:
    """A config whose control, publish and zmq camera are CurveZMQ sockets on the pki fixture's keys."""
    write_grey_bundle(tmp_path / "bundle")
    curve = {"server_secret_key": str(pki["server"][1]), "allowed_clients_dir": str(pki["allow_dir"])}
    return {
        "station": "line1",
        "model": {"bundle": "bundle"},
        "cameras": [
            {"id": "cam0", "source": {"kind": "synthetic"}},
            {"id": "cam1", "source": {"kind": "zmq", "endpoint": f"ipc://{tmp_path}/cam1.sock", "curve": curve}},
        ],
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock", "curve": curve},
        "control": {"endpoint": f"ipc://{tmp_path}/control.sock", "curve": curve},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
    }


def _damage(pki, tmp_path: Path, config: dict, how: str) -> tuple[str, str]:
    """Damage the key material of one socket as `run` would refuse it: (where, what the refusal says)."""
    own = keys.generate(tmp_path / "cam1-keys", "cam1")
    camera = config["cameras"][1]["source"]["curve"] = dict(config["cameras"][1]["source"]["curve"])
    camera["server_secret_key"] = str(own[1])
    if how == "missing-secret":
        config["control"]["curve"] = {
            **config["control"]["curve"],
            "server_secret_key": str(tmp_path / "no.key_secret"),
        }
        return "control.curve.server_secret_key", "cannot read (No such file or directory)"
    if how == "secret-mode-0644":
        os.chmod(own[1], 0o644)
        return "cameras[1].source.curve.server_secret_key", "mode 0644 lets group/others read it"
    if how == "secret-cut":
        secret = re.search(r'secret-key = "([^"]*)"', own[1].read_text()).group(1)  # type: ignore[union-attr]
        own[1].write_text(own[1].read_text().replace(secret, secret[:30]))
        return "cameras[1].source.curve.server_secret_key", "its secret key is not the 40-character Z85 secret"
    if how == "allow-list-missing":
        config["publish"]["curve"] = {**config["publish"]["curve"], "allowed_clients_dir": str(tmp_path / "none")}
        return "publish.curve.allowed_clients_dir", "cannot read (No such file or directory)"
    # "secret-in-allow-list": a client's whole pair where its public key belongs
    (pki["allow_dir"] / "bridge1.key").write_bytes(pki["allowed"][1].read_bytes())
    return "control.curve.allowed_clients_dir", "holds a secret key, expected the public NAME.key"


@pytest.mark.parametrize(
    "how", ["missing-secret", "secret-mode-0644", "secret-cut", "allow-list-missing", "secret-in-allow-list"]
)
def test_check_refuses_the_key_material_run_refuses(tmp_path, pki, how):
    """The key paths are config values: `--check` loads them by the loader `run` starts with (it said "valid" for a
    missing, damaged or world-readable key that `run` refuses)."""
    config = _curve_config(tmp_path, pki)
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert inspectd("run", "--check", "--config", str(path)).returncode == 0
    where, said = _damage(pki, tmp_path, config, how)
    path.write_text(yaml.safe_dump(config))
    checked = inspectd("run", "--check", "--config", str(path))
    assert checked.returncode == 2, checked.stdout
    assert checked.stderr.startswith(f"inspectd run --check: {where} ") and said in checked.stderr, checked.stderr
    assert checked.stderr.count("\n") == 1


def test_a_zmq_cameras_key_is_named_by_its_position_in_check_and_at_start(tmp_path, pki):
    """Every error names a camera by its position in the file (`cameras[0]`), as the loader does: a zmq camera's key
    errors named it by id, and an id may be a number, so `cameras[1]` pointed at another camera."""
    config = _curve_config(tmp_path, pki)
    config["cameras"] = [{**config["cameras"][1], "id": "1"}, {**config["cameras"][0], "id": "0"}]
    own = keys.generate(tmp_path / "cam-keys", "cam")
    os.chmod(own[1], 0o644)
    config["cameras"][0]["source"] = {**config["cameras"][0]["source"]}
    config["cameras"][0]["source"]["curve"] = {
        **config["cameras"][0]["source"]["curve"],
        "server_secret_key": str(own[1]),
    }
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    where = "cameras[0].source.curve.server_secret_key "
    checked = inspectd("run", "--check", "--config", str(path))
    assert checked.returncode == 2 and checked.stderr.startswith(f"inspectd run --check: {where}"), checked.stderr
    started = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, ALLOW_ROOT_ENV: "1"},
    )
    assert started.returncode == 2 and where in started.stderr, started.stderr


def test_check_notes_an_allow_list_that_lets_nobody_in(tmp_path, pki):
    """An empty allow-list is accepted (how the last client is revoked), but an installer checking a new config is
    shown that it lets nobody in: a directory with no key in it is often the wrong one."""
    config = _curve_config(tmp_path, pki)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    config["publish"]["curve"] = {**config["publish"]["curve"], "allowed_clients_dir": str(empty)}
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = inspectd("run", "--check", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert (
        f"  note: publish.curve.allowed_clients_dir {empty} holds no client key (*.key): every client is refused there"
    ) in checked.stdout.splitlines()


def readable_station(root: Path) -> tuple[Path, dict]:
    """A bundle under `root` every user may read, and a config naming it (relative to a config file in `root`)."""
    bundle = write_grey_bundle(root / "bundle")
    for folder in (bundle, *(p for p in bundle.rglob("*") if p.is_dir())):
        folder.chmod(0o755)
    for member in (p for p in bundle.rglob("*") if p.is_file()):
        member.chmod(0o644)
    config = {
        "station": "line1",
        "model": {"bundle": "bundle"},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
        "publish": {"endpoint": f"ipc://{root}/pub.sock"},
        "metrics": {"listen": None},
        "state_dir": str(root / "state"),
    }
    (root / "state").mkdir()
    if os.geteuid() == 0:
        os.chown(root / "state", 65534, 65534)  # the service user's, as StateDirectory= leaves it
    return bundle, config


def _check_as_nobody(root: Path, config: dict, state: Path) -> subprocess.CompletedProcess:
    """`sudo inspectd run --check --service-user nobody` of `config` (a readable_station in `root`) with state_dir
    `state`."""
    path = root / "line2.yaml"
    path.write_text(yaml.safe_dump({**config, "state_dir": str(state)}))
    path.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ROOT_ENV}
    argv = [sys.executable, "-m", "inspectd", "run", "--check", "--config", str(path), "--service-user", "nobody"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a check run as root can pass a folder the unit cannot write")
def test_check_as_root_notes_a_state_dir_under_var_lib_inspectd_the_service_user_cannot_write_yet(open_tmp_path):
    """A hand-made /var/lib/inspectd/line2 left root's passed `sudo inspectd run --check` with no word; the start
    then failed (exit 1, retried) where no StateDirectory= hands it to the service user. The check refused it
    (exit 2), though the unit's StateDirectory= gives an existing /var/lib/inspectd/NAME to User= at start: a note.
    A name not there yet, so that the test makes nothing under /var/lib."""
    from inspectd.daemon.config import DEFAULT_STATE_DIR

    state = DEFAULT_STATE_DIR / f"check-test-{os.getpid()}-{open_tmp_path.name}"
    existing = next(path for path in (state, *state.parents) if path.exists())
    if existing.stat().st_uid == 65534:
        pytest.skip(f"{existing} is nobody's here: nobody may write it")
    done = _check_as_nobody(open_tmp_path, readable_station(open_tmp_path)[1], state)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("  note: as the service user")]
    assert notes == [
        f"  note: as the service user nobody (the unit's User=), state_dir {state}: not writable by this user now (it "
        f"would be created in {existing}, which it may not write): a unit's StateDirectory= gives /var/lib/inspectd "
        "(inspectd.service) or /var/lib/inspectd/NAME (inspectd@NAME) to its User= at start, creating it where missing"
    ], done.stdout
    assert not state.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only a check run as root can pass a folder the unit cannot write")
def test_check_as_root_refuses_a_state_dir_elsewhere_the_service_user_cannot_write(open_tmp_path):
    """A state_dir outside /var/lib/inspectd the service user could not write passed the check with a note telling
    to chown it; the units' ProtectSystem=strict keeps it read-only whoever owns it, and the start failed anyway."""
    own = open_tmp_path / "own"
    own.mkdir()
    own.chmod(0o755)
    os.chown(own, 65534, 65534)
    config = readable_station(open_tmp_path)[1]
    os.chown(open_tmp_path / "state", 0, 0)
    for state, made in (
        (open_tmp_path / "state", ""),
        (open_tmp_path / "made" / "state", f" (it would be created in {open_tmp_path}, which it may not write)"),
        (own / "made" / "state", None),
    ):
        done = _check_as_nobody(open_tmp_path, config, state)
        if made is None:
            assert done.returncode == 0 and done.stderr == "", done.stderr
            assert "  note: as the service user" not in done.stdout, done.stdout
            continue
        assert done.returncode == 2, done.stdout
        assert done.stderr == (
            f"inspectd run --check: as the service user nobody (the unit's User=), state_dir {state}: not writable by "
            f"this user{made}, expected a directory it owns or may write (chown it to the service user; the units "
            "also leave any folder outside /var/lib/inspectd read-only: add it to ReadWritePaths= in a drop-in)\n"
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="only a check run as root can pass a file the unit cannot read")
def test_check_as_root_loads_what_the_daemon_loads_as_the_service_user(open_tmp_path):
    """`sudo cp` of a config (root's, 0640), a bundle copied by root with a tight umask, an allow-list key of another
    owner passed `sudo inspectd run --check` as valid; then the unit, running as the service user, exited 2 unretried
    (or 1, retried until systemd gave up). The check now loads them as that user, in the daemon's own words."""
    bundle, config = readable_station(open_tmp_path)
    path = open_tmp_path / "line2.yaml"
    path.write_text(yaml.safe_dump(config))

    def check(*extra: str, config_path: str = str(path), cwd: Path = REPO) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != ALLOW_ROOT_ENV}
        argv = [sys.executable, "-m", "inspectd", "run", "--check", "--config", config_path, *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, env=env)

    def refused(result: subprocess.CompletedProcess, said: str) -> None:
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "as the service user nobody (the unit's User=), " in result.stderr and said in result.stderr, (
            result.stderr
        )

    path.chmod(0o640)  # as `sudo cp` leaves it: root's, group root
    refused(check("--service-user", "nobody"), f"{path}: cannot read config (Permission denied)")
    # Given by a relative path from a folder the service user cannot enter: judged by the file, not the way there.
    private = open_tmp_path / "private"
    private.mkdir(mode=0o700)
    refused(check("--service-user", "nobody", config_path=os.path.relpath(path, private), cwd=private), "cannot read")
    path.chmod(0o644)
    for member in ("manifest.json", "scorer.npz"):
        (bundle / member).chmod(0o600)
        refused(check("--service-user", "nobody"), member)
        (bundle / member).chmod(0o644)
    ok = check("--service-user", "nobody")
    assert ok.returncode == 0 and f"{path}: valid" in ok.stdout and "note: no user" not in ok.stdout, ok.stderr
    # A service user that does not exist here (a check on a build machine, a name mistyped) is said, not passed over.
    path.chmod(0o600)
    unknown = check("--service-user", "no-such-user-here")
    note = "note: no user no-such-user-here here, so what the unit's daemon may read was not checked"
    assert unknown.returncode == 0 and note in unknown.stdout, unknown.stdout
    # '' for a config no unit runs (a tree being built, a test): checked as root alone, without a note.
    root_alone = check("--service-user", "")
    assert root_alone.returncode == 0 and "note: no user" not in root_alone.stdout, root_alone.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="only a check run as root can pass a key the unit's user may not own")
def test_check_as_root_refuses_an_allow_list_key_the_service_user_would_refuse(open_tmp_path):
    """The daemon checks its key files' owners (its own, or root's); as root the check left owners out."""
    keydir = open_tmp_path / "keys"
    keydir.mkdir()
    keydir.chmod(0o755)
    keys.generate(keydir, "server")
    allowed = keydir / "allowed"
    allowed.mkdir()
    allowed.chmod(0o755)
    keys.generate(keydir, "client")
    shutil.copy(keydir / "client.key", allowed / "client.key")
    (allowed / "client.key").chmod(0o644)
    os.chown(keydir / "server.key_secret", 65534, 65534)  # the service user's own
    config = readable_station(open_tmp_path)[1]
    config["control"] = {
        "endpoint": f"tcp://127.0.0.1:{free_port()}",
        "curve": {"server_secret_key": str(keydir / "server.key_secret"), "allowed_clients_dir": str(allowed)},
    }
    path = open_tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ROOT_ENV}
    argv = [sys.executable, "-m", "inspectd", "run", "--check", "--config", str(path), "--service-user", "nobody"]
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr
    os.chown(allowed / "client.key", 1, 1)  # another user's (daemon)
    other = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert other.returncode == 2 and "as the service user nobody" in other.stderr, other.stderr
    assert "client.key" in other.stderr and len(other.stderr.strip().splitlines()) == 1, other.stderr


@pytest.mark.parametrize("damage", ["newer-ir-version", "not-a-graph"])
def test_check_opens_the_engine_and_refuses_a_graph_onnx_runtime_cannot_load(tmp_path, damage):
    """A graph exported on a newer machine (an IR version this onnxruntime does not know) matches every checksum:
    --check said valid, and the unit's start failed (exit 1, retried)."""
    import hashlib
    import json

    import onnx

    bundle = write_grey_bundle(tmp_path / "bundle")
    graph = bundle / "model.onnx"
    if damage == "newer-ir-version":
        model = onnx.load(str(graph))
        model.ir_version = 99
        onnx.save(model, str(graph))
    else:
        graph.write_bytes(os.urandom(2000))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    config = {**line_config(tmp_path), "engine": {"options": {"providers": "cpu"}}}
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = inspectd("run", "--check", "--config", str(path))
    assert checked.returncode == 2, checked.stdout
    assert checked.stderr.startswith(f"inspectd run --check: {graph}: ONNX Runtime cannot load it ("), checked.stderr
    assert checked.stderr.count("\n") == 1 and not (tmp_path / "state").exists()


def test_check_notes_a_bundle_outside_state_dir_whose_thresholds_the_units_would_not_let_it_write(tmp_path):
    """Under the units the daemon writes only its state_dir: a bundle elsewhere ran, and the first ctl set-thresholds
    failed with "Read-only file system", far from the config that caused it."""
    write_grey_bundle(tmp_path / "bundle")
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(line_config(tmp_path)))
    outside = inspectd("run", "--check", "--config", str(path))
    assert outside.returncode == 0, outside.stderr
    assert f"  note: model.bundle {tmp_path / 'bundle'} is outside state_dir {tmp_path / 'state'}: " in outside.stdout
    path.write_text(yaml.safe_dump({**line_config(tmp_path), "state_dir": str(tmp_path)}))
    inside = inspectd("run", "--check", "--config", str(path))
    assert inside.returncode == 0 and "is outside state_dir" not in inside.stdout, inside.stdout


def test_check_notes_ipc_sockets_the_units_hide_or_make_read_only(tmp_path):
    """Under the units the daemon has a /tmp of its own (PrivateTmp=yes), no /home (ProtectHome=yes) and a read-only
    tree outside state_dir and /run/inspectd (ProtectSystem=strict): a socket bound in the private /tmp ran healthy
    and no subscriber, client or producer outside ever found it; one elsewhere failed every start's bind."""
    state = tmp_path / "state"
    write_grey_bundle(state / "bundle")
    config = {
        **line_config(tmp_path),
        "model": {"bundle": str(state / "bundle")},
        "cameras": [
            {"id": "cam0", "source": {"kind": "synthetic"}},
            {"id": "cam1", "source": {"kind": "zmq", "endpoint": "ipc:///home/line/cam1.sock"}},
            {"id": "cam2", "source": {"kind": "zmq", "endpoint": "ipc://@cam2"}},
            {"id": "cam3", "source": {"kind": "zmq", "endpoint": "tcp://127.0.0.1:5560"}},
        ],
        "publish": {"endpoint": "ipc:///tmp/inspectd/pub.sock"},
        "control": {"endpoint": "ipc:///etc/inspectd/control.sock"},
        "state_dir": str(state),
    }
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = inspectd("run", "--check", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    notes = [line for line in checked.stdout.splitlines() if "under the systemd units" in line and "sock" in line]
    expected = f"; expected a socket under /run/inspectd or state_dir {state}"
    assert notes == [
        "  note: publish.endpoint ipc:///tmp/inspectd/pub.sock: under the systemd units PrivateTmp=yes gives the "
        f"daemon a /tmp of its own, so nothing outside the unit finds the socket{expected}",
        "  note: control.endpoint ipc:///etc/inspectd/control.sock: under the systemd units ProtectSystem=strict makes "
        "it read-only to the daemon, which may write only state_dir and /run/inspectd, so its bind fails at every "
        f"start (unless a drop-in lists its folder in ReadWritePaths=){expected}",
        "  note: cameras[1].source.endpoint ipc:///home/line/cam1.sock: under the systemd units ProtectHome=yes makes "
        f"/home inaccessible to the daemon, so its bind fails at every start{expected}",
    ], checked.stdout

    # Where the units leave them (the default control socket is in state_dir): nothing to say.
    config["publish"] = {"endpoint": "ipc:///dev/shm/inspectd-pub.sock"}  # /dev the units leave as it is
    config["control"] = {"endpoint": "ipc:///run/inspectd/control.sock"}
    config["cameras"][1]["source"]["endpoint"] = f"ipc://{state}/cam1.sock"
    path.write_text(yaml.safe_dump(config))
    placed = inspectd("run", "--check", "--config", str(path))
    assert placed.returncode == 0 and "under the systemd units" not in placed.stdout, placed.stdout


def test_check_says_a_genicam_camera_cannot_open_where_aravis_does_not_import(tmp_path):
    """install.sh leaves Aravis to deploy/aravis.sh: a genicam station installed without it passed `run --check` and
    then ran with that camera failed for good."""
    write_grey_bundle(tmp_path / "bundle")
    config = line_config(tmp_path)
    config["cameras"] = [*config["cameras"], {"id": "cam1", "source": {"kind": "genicam"}}]
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    # This machine's Aravis hidden, as on a station without deploy/aravis.sh (make test links it into the venv).
    without_gi = "import runpy, sys; sys.modules['gi'] = None; runpy.run_module('inspectd', run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ROOT_ENV}

    def check_without_gi() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", without_gi, "run", "--check", "--config", str(path), "--service-user", ""],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=env,
        )

    checked = check_without_gi()
    assert checked.returncode == 0, checked.stderr
    notes = [line for line in checked.stdout.splitlines() if "Aravis" in line]
    assert len(notes) == 1 and notes[0].startswith("  note: cameras cam1: genicam: Aravis through PyGObject is not"), (
        checked.stdout
    )
    assert "run deploy/aravis.sh VENV" in notes[0] and notes[0].endswith("they fail at start, not retried")
    config["cameras"] = config["cameras"][:1]
    path.write_text(yaml.safe_dump(config))
    plain = check_without_gi()
    assert plain.returncode == 0 and "Aravis" not in plain.stdout, "no genicam camera, nothing said"
