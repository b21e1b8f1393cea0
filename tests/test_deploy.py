"""deploy/install.sh into a scratch root (twice: the second run must change nothing) and the systemd units."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from other_user import as_nobody
from ports import free_port
from station_model import write_grey_bundle

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "deploy" / "install.sh"
UNITS = ("inspectd.service", "inspectd@.service", "inspectd-bridge@.service")
DAEMON_UNITS = ("inspectd.service", "inspectd@.service")


def _install(prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(INSTALL), "--prefix", str(prefix), "--no-venv", *extra], capture_output=True, text=True, timeout=60
    )


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its mode, mtime and content hash: what "changes nothing" is checked against."""
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        tree[str(path.relative_to(root))] = (stat.filemode(st.st_mode), st.st_mtime_ns, digest)
    return tree


def test_install_twice_into_prefix_builds_the_tree_and_the_rerun_changes_nothing(tmp_path):
    root = tmp_path / "root"
    first = _install(root)
    assert first.returncode == 0, first.stderr
    tree = _snapshot(root)

    for directory, mode in [
        ("etc/inspectd", "drwxr-x---"),
        ("etc/inspectd/keys", "drwx------"),
        ("etc/inspectd/clients", "drwxr-x---"),
        ("var/lib/inspectd", "drwxr-x---"),
        ("var/lib/inspectd/bundles", "drwxr-x---"),
        ("var/lib/inspectd/engines", "drwxr-x---"),
        ("var/lib/inspectd/journal", "drwxr-x---"),
        ("opt/inspectd", "drwxr-xr-x"),
        ("etc/systemd/system", "drwxr-xr-x"),
    ]:
        assert tree[directory][0] == mode, directory
    for unit in UNITS:
        installed = root / "etc/systemd/system" / unit
        assert installed.read_bytes() == (REPO / "systemd" / unit).read_bytes()
        assert tree[f"etc/systemd/system/{unit}"][0] == "-rw-r--r--"
    # --no-venv: no pip run, no virtualenv
    assert not (root / "opt/inspectd/venv").exists()
    for name in ("inspectd", "bridge"):  # every deploy/*.example.yaml becomes /etc/inspectd/<name>.yaml
        example = REPO / "deploy" / f"{name}.example.yaml"
        assert (root / f"etc/inspectd/{name}.yaml").read_bytes() == example.read_bytes()
        assert tree[f"etc/inspectd/{name}.yaml"][0] == "-rw-r-----"
    assert (root / "etc/inspectd/bridge.env.example").read_bytes() == (REPO / "deploy/bridge.example.env").read_bytes()

    second = _install(root)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert _snapshot(root) == tree


def test_operator_config_survives_a_reinstall_and_a_wrong_mode_is_repaired(tmp_path):
    root = tmp_path / "root"
    assert _install(root).returncode == 0
    config = root / "etc/inspectd/inspectd.yaml"
    config.write_text("station: edited-by-operator\n")
    os.chmod(root / "var/lib/inspectd", 0o777)
    rerun = _install(root)
    assert rerun.returncode == 0, rerun.stderr
    assert config.read_text() == "station: edited-by-operator\n"
    assert stat.S_IMODE((root / "var/lib/inspectd").stat().st_mode) == 0o750
    assert "nothing to do" not in rerun.stdout


def test_a_state_dir_moved_to_another_disk_through_a_symlink_is_up_to_date_on_a_rerun(tmp_path):
    """The mode checked is the directory's, not the link's own (always 777): a rerun changes nothing."""
    root = tmp_path / "root"
    assert _install(root).returncode == 0
    state = root / "var/lib/inspectd"
    moved = tmp_path / "bigdisk" / "inspectd"
    moved.parent.mkdir()
    state.rename(moved)
    state.symlink_to(moved)
    tree = _snapshot(root)
    rerun = _install(root)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == f"install.sh: nothing to do, {root} is up to date"
    assert _snapshot(root) == tree and stat.S_IMODE(moved.stat().st_mode) == 0o750


@pytest.mark.parametrize("planted", ["link", "file"])
def test_a_link_or_file_the_service_put_in_place_of_a_state_folder_is_refused_and_not_followed(tmp_path, planted):
    """The service user owns /var/lib/inspectd and can put a link where bundles/ was; the next install, run as root,
    set the mode of (and on a station chowned to the service) whatever the link named: bundles -> /etc."""
    root = tmp_path / "root"
    assert _install(root).returncode == 0
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    bundles = root / "var/lib/inspectd/bundles"
    bundles.rmdir()
    if planted == "link":
        bundles.symlink_to(victim)
        expected = f"install.sh: {bundles}: a symbolic link (to {victim}), expected a directory; put what it names in "
        expected += "its place and rerun"
    else:
        bundles.write_text("")
        expected = f"install.sh: {bundles}: not a directory, expected the service's bundles folder; move it away and "
        expected += "rerun"
    # Refused before anything is made: on a station pip would otherwise have replaced the venv already.
    (root / "etc/inspectd/clients").rmdir()
    rerun = _install(root)
    assert (rerun.returncode, rerun.stderr.strip()) == (2, expected)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755 and not (root / "etc/inspectd/clients").exists()


@pytest.mark.parametrize("planted", ["dangling-link", "file"])
def test_a_state_folder_that_is_a_link_to_nothing_or_a_file_is_refused_before_anything_is_made(tmp_path, planted):
    """State moved to a disk that is not mounted: the install went on and died late, in a bare `mkdir: File exists`."""
    root = tmp_path / "root"
    assert _install(root).returncode == 0
    state = root / "var/lib/inspectd"
    shutil.rmtree(state)
    if planted == "dangling-link":
        gone = tmp_path / "unmounted" / "inspectd"
        state.symlink_to(gone)
        expected = f"install.sh: {state}: a symbolic link to nothing ({gone}), expected a directory: mount what it "
        expected += "names and rerun"
    else:
        state.write_text("")
        expected = f"install.sh: {state}: not a directory, expected the service's state folder; move it away and rerun"
    (root / "etc/inspectd/clients").rmdir()
    rerun = _install(root)
    assert (rerun.returncode, rerun.stderr.strip()) == (2, expected)
    assert not (root / "etc/inspectd/clients").exists()


def test_a_gpu_station_install_without_the_venv_installs_the_tree(tmp_path):
    """--with-gpu cu12 merges the CUDA 12 pins for pip; with --no-venv there is no pip to read them."""
    result = _install(tmp_path / "root", "--with-gpu", "cu12")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "root/etc/systemd/system/inspectd.service").is_file()


def test_install_refuses_an_unknown_argument(tmp_path):
    result = _install(tmp_path / "root", "--frobnicate")
    assert result.returncode == 2
    assert "unknown argument --frobnicate" in result.stderr


@pytest.mark.parametrize("args", [("--prefix", ""), ("--prefix=",)])
def test_install_refuses_an_empty_prefix_rather_than_installing_onto_this_system(args):
    """`--prefix "$DESTDIR"` with DESTDIR unset. Run as nobody when the tests run as root: an install.sh that took the
    empty prefix for a system install then stops at its root check instead of installing onto this machine."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed: refusing to run install.sh without a prefix as root")
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [*user, "sh", str(INSTALL), *args, "--no-venv"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "install.sh: --prefix: expected a directory, got an empty string (leave --prefix out for a system install)"
    )


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (("--with-train", "--with-gpu", "cu12"), "--with-gpu cu12 with --with-train: PyPI's torch needs CUDA 13"),
        (("--torch-index", "https://download.pytorch.org/whl/cpu"), "--torch-index: only used with --with-train"),
    ],
)
def test_install_refuses_options_pip_could_only_fail_on_or_would_ignore_before_touching_the_root(
    tmp_path, args, refusal
):
    root = tmp_path / "root"
    result = subprocess.run(
        ["sh", str(INSTALL), "--prefix", str(root), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and refusal in result.stderr
    assert not root.exists()


def test_install_refuses_an_interpreter_without_venv_and_does_not_take_a_half_made_venv_for_a_made_one(tmp_path):
    # Debian's python3 without python3-venv: ensurepip is missing and `-m venv` leaves bin/python without pip.
    python = _script(tmp_path / "python3-no-venv", "*ensurepip*|*venv*) echo 'No module named ensurepip' >&2; exit 1")
    root = tmp_path / "root"
    half_made = root / "opt" / "inspectd" / "venv" / "bin"
    half_made.mkdir(parents=True)
    _script(half_made / "python", "*pip*) echo 'No module named pip' >&2; exit 1")
    for _ in range(2):  # a rerun is refused the same way, not stopped at the half-made venv's missing pip
        result = _install_python(root, str(python))
        assert result.returncode == 2, result.stdout
        assert result.stderr.strip() == (
            f"install.sh: {python} cannot create a virtualenv; install its venv module "
            "(Debian/Ubuntu: apt install python3-venv)"
        )
    missing = tmp_path / "nopython"
    result = _install_python(root, str(missing))
    assert result.returncode == 2
    assert result.stderr.strip() == f"install.sh: --python {missing}: not found, expected a Python 3 interpreter"


def _script(path: Path, refused: str) -> Path:
    """A Python that refuses the commands matching the case pattern `refused` and runs the others."""
    path.write_text(f'#!/bin/sh\ncase "$*" in {refused};; esac\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def _install_python(root: Path, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(INSTALL), "--prefix", str(root), "--python", python], capture_output=True, text=True, timeout=60
    )


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is not installed: `make test` installs it (apt-get install systemd)"
    return path


def test_units_pass_systemd_analyze_verify(tmp_path):
    # verify insists ExecStart exists and is executable; a stub stands in for the virtualenv's console script.
    stub = tmp_path / "inspectd"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    paths = []
    for unit in UNITS:
        text = (REPO / "systemd" / unit).read_text().replace("/opt/inspectd/venv/bin/inspectd", str(stub))
        name = unit.replace("@.", "@line1.")  # a template is verified as one of its instances
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    result = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inspectd" not in result.stderr, result.stderr  # no warnings about our units either


@pytest.mark.parametrize("unit", UNITS)
def test_units_offline_security_exposure_is_below_2(unit):
    command = [_systemd_analyze(), "security", "--offline=yes", "--no-pager", str(REPO / "systemd" / unit)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    last = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert last, result.stdout + result.stderr
    score = float(last[0].split(":")[1].split()[0])
    assert score < 2.0, last[0]


def _unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_units_documentation_and_every_page_it_links_to_are_installed(tmp_path):
    """Documentation= names a page under /opt/inspectd/share/doc; that page, and every local page or image it links
    to (and they to theirs), is installed there, so no link on the station is dead."""
    root = tmp_path / "root"
    assert _install(root).returncode == 0
    todo = []
    for unit in UNITS:
        for url in _unit(unit)["Documentation"]:
            assert url.startswith("file:///opt/inspectd/share/doc/"), (unit, url)
            todo.append(root / url.removeprefix("file:///"))
    seen: set[Path] = set()
    while todo:
        page = todo.pop()
        assert page.is_file(), page
        if page in seen or page.suffix != ".md":
            seen.add(page)
            continue
        seen.add(page)
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            todo.append(page.parent / target)
    assert {path.name for path in seen} >= {"DEPLOY.md", "PLC.md", "PROTOCOL.md", "web-view.png"}


def _under(path: Path, roots: list[str]) -> bool:
    return any(path.resolve().is_relative_to(root) for root in roots)


def test_the_daemon_unit_runs_a_command_the_cli_accepts_and_lets_it_write_where_the_default_config_writes():
    """What the unit must agree with the program on, checked against the program rather than against the unit's own
    strings: the command line parses, and every place the installed default config writes (state, journal, archive,
    control socket) is writable under ProtectSystem=strict."""
    from inspectd.cli import build_parser
    from inspectd.daemon.config import load_config

    settings = _unit("inspectd.service")
    argv = settings["ExecStart"][0].split()
    assert argv[0] == "/opt/inspectd/venv/bin/inspectd"
    args = build_parser(argv[1]).parse_args(argv[1:])
    assert args.func.__module__ == "inspectd.daemon.service"
    assert args.config == Path("/etc/inspectd/inspectd.yaml")  # where install.sh puts deploy/inspectd.example.yaml
    config = load_config(REPO / "deploy" / "inspectd.example.yaml")
    writable = settings["ReadWritePaths"]
    assert _under(config.state_dir, writable)
    assert config.journal_path is not None and _under(config.journal_path, writable)
    if config.archive.enabled:
        assert _under(config.archive.path, writable)
    assert _under(config.model.bundle, writable)  # thresholds.json is written into the bundle
    assert config.control.endpoint.startswith("ipc://")
    assert _under(Path(config.control.endpoint[len("ipc://") :]).parent, writable)
    assert settings["Type"] == ["notify"]  # the daemon sends READY=1 and WATCHDOG=1 (tests/test_notify.py)


def test_a_template_instance_runs_its_own_config_and_may_write_where_that_config_writes():
    """inspectd@line2 as DEPLOY.md sets it up: the example config copied to /etc/inspectd/line2.yaml with
    `state_dir: /var/lib/inspectd/line2` and its bundle under it. Its command must read that file (not the shared
    one), and everything the config writes must be writable under the instance's own ReadWritePaths: the example's
    other paths follow state_dir by themselves."""
    from inspectd.cli import build_parser
    from inspectd.configfile import read_yaml
    from inspectd.daemon.config import parse_config

    settings = {k: [v.replace("%i", "line2") for v in vs] for k, vs in _unit("inspectd@.service").items()}
    argv = settings["ExecStart"][0].split()
    args = build_parser(argv[1]).parse_args(argv[1:])
    assert args.func.__module__ == "inspectd.daemon.service"
    assert args.config == Path("/etc/inspectd/line2.yaml")
    raw = read_yaml(REPO / "deploy" / "inspectd.example.yaml")
    raw["state_dir"] = "/var/lib/inspectd/line2"
    raw["model"]["bundle"] = "/var/lib/inspectd/line2/bundles/current"
    config = parse_config(raw, source="line2.yaml", base_dir="/etc/inspectd")
    writable = settings["ReadWritePaths"]
    assert Path("/var/lib") / settings["StateDirectory"][0] == config.state_dir  # created by systemd, owned by User=
    assert not _under(Path("/var/lib/inspectd/line1"), writable), "an instance may write into another's state"
    for path in (config.state_dir, config.journal_path, config.archive.path, config.model.bundle):
        assert path is not None and _under(path, writable), path
    assert config.control.endpoint.startswith("ipc://")
    assert _under(Path(config.control.endpoint[len("ipc://") :]).parent, writable)


def test_the_bridge_unit_runs_a_command_the_cli_accepts_with_the_journal_the_daemon_writes(monkeypatch):
    from inspectd.cli import build_parser
    from inspectd.daemon.config import load_config

    settings = _unit("inspectd-bridge@.service")
    assert settings["EnvironmentFile"] == ["/etc/inspectd/bridge-%i.env"]
    env = dict(
        line.split("=", 1)
        for line in (REPO / "deploy" / "bridge.example.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    command = settings["ExecStart"][0].replace("$INSPECTD_BRIDGE_ARGS", env["INSPECTD_BRIDGE_ARGS"]).split()
    assert command[0] == "/opt/inspectd/venv/bin/inspectd"
    state = Path("/var/lib") / settings["StateDirectory"][0]  # systemd exports it as STATE_DIRECTORY
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    args = build_parser(command[1]).parse_args(command[1:])
    assert args.func.__module__ == "inspectd.clients.bridge"
    # The bridge's catch-up reads the journal the default daemon config writes, and may read it under the unit.
    daemon = load_config(REPO / "deploy" / "inspectd.example.yaml")
    assert args.journal == daemon.journal_path
    assert _under(args.journal, settings["ReadOnlyPaths"])
    assert args.endpoint == daemon.publish.endpoint
    assert Path(args.config) == Path("/etc/inspectd/bridge.yaml")  # install.sh installs deploy/bridge.example.yaml
    # Where it records what the PLC acknowledged: its own state directory, writable under ProtectSystem=strict.
    assert Path(args.state_dir) == state and not _under(Path(args.state_dir), settings["ReadOnlyPaths"])


# A child that opens the bundle on ONNX Runtime as the daemon does (through open_engine) and runs one batch.
_ONE_INFERENCE = """import sys
import numpy as np
from engines.bundle.store import load_bundle
from engines.runtime import open_engine
with open_engine(load_bundle(sys.argv[1]), "onnxruntime", {"intra_op_threads": 1}) as engine:
    engine.infer(np.full((2, 32, 32, 1), 128, np.uint8))
"""


def test_onnx_runtime_writes_nothing_in_the_services_home_and_nothing_but_json_on_stderr(open_tmp_path):
    """An inspectd@NAME instance's HOME (/var/lib/inspectd) is read-only to it: ONNX Runtime's telemetry, trying to
    keep a device id under ~/.cache, printed a coloured line that is not JSON, and `journalctl -o cat | jq` stops
    there. Where HOME is writable (the single unit's state dir) it left a telemetry database. Run as another user
    than root, for whom a folder's mode does not apply."""
    bundle = write_grey_bundle(open_tmp_path / "bundle")
    read_only, writable = open_tmp_path / "home-ro", open_tmp_path / "home-rw"
    read_only.mkdir(mode=0o555)
    writable.mkdir(mode=0o777)
    writable.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    env["PYTHONPATH"] = str(REPO)
    for home in (read_only, writable):
        child = subprocess.run(
            as_nobody([sys.executable, "-c", _ONE_INFERENCE, str(bundle)]),
            cwd="/",
            env={**env, "HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 0, child.stderr
        for line in child.stderr.splitlines():
            assert line.startswith("{") and json.loads(line), f"not JSON on stderr: {line!r}"
        assert list(home.rglob("*")) == [], home


def _namespace_reason() -> str | None:
    if os.geteuid() != 0:
        return "the system install path needs root (useradd, chown) in a private mount namespace"
    for tool in ("unshare", "mount", "useradd", "groupadd", "usermod"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare -m not permitted here: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(_namespace_reason() is not None, reason=str(_namespace_reason()))
def test_system_install_creates_user_groups_and_owners_and_is_idempotent(tmp_path):
    """The real (non --prefix) path, run twice inside a private mount namespace over copies of /etc, /opt and
    /var/lib, so useradd/groupadd/chown happen for real without touching this machine."""
    etc, opt, var_lib, run_systemd = (tmp_path / n for n in ("etc", "opt", "var-lib", "run-systemd"))
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True, timeout=60)
    for d in (opt, var_lib, run_systemd):
        d.mkdir()
    (etc / ".inspectd-test-copy").write_text("")
    script = f"""set -e
mount --bind {etc} /etc
mount --bind {opt} /opt
mount --bind {var_lib} /var/lib
if [ -d /run/systemd ]; then mount --bind {run_systemd} /run/systemd; fi
test -f /etc/.inspectd-test-copy  # never run the install unless /etc is the copy
sh {INSTALL} --no-venv
echo '--- second run'
sh {INSTALL} --no-venv
echo '--- state'
id -nG inspectd
getent passwd inspectd | cut -d: -f6,7
stat -c '%U:%G %a %n' /etc/inspectd /etc/inspectd/inspectd.yaml /etc/inspectd/keys /etc/inspectd/clients \
    /var/lib/inspectd /var/lib/inspectd/journal \
    /opt/inspectd /etc/systemd/system/inspectd.service
"""
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    first, rest = result.stdout.split("--- second run\n")
    second, state = rest.split("--- state\n")
    assert "created system user inspectd" in first or "added inspectd to group" in first
    assert second.strip() == "install.sh: nothing to do, / is up to date"
    lines = state.strip().splitlines()
    assert {"inspectd", "video", "render"} <= set(lines[0].split())
    assert lines[1] == "/var/lib/inspectd:/usr/sbin/nologin"
    assert lines[2:] == [
        "root:inspectd 750 /etc/inspectd",
        "root:inspectd 640 /etc/inspectd/inspectd.yaml",
        "inspectd:inspectd 700 /etc/inspectd/keys",
        "root:inspectd 750 /etc/inspectd/clients",
        "inspectd:inspectd 750 /var/lib/inspectd",
        "inspectd:inspectd 750 /var/lib/inspectd/journal",
        "root:root 755 /opt/inspectd",
        "root:root 644 /etc/systemd/system/inspectd.service",
    ]
    # The copy's marker is not visible outside: the mounts stayed inside the namespace.
    assert not Path("/etc/.inspectd-test-copy").exists()


@pytest.mark.skipif(_namespace_reason() is not None, reason=str(_namespace_reason()))
def test_a_station_reinstall_neither_chowns_nor_chmods_what_a_link_in_the_state_folder_names(tmp_path):
    """As above, the real path: the service user swapped journal/ for a link to a root-owned folder, and install.sh as
    root chowned that folder to the service (a link to /etc: the service owns the station)."""
    etc, opt, var_lib = (tmp_path / n for n in ("etc", "opt", "var-lib"))
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True, timeout=60)
    for d in (opt, var_lib):
        d.mkdir()
    (etc / ".inspectd-test-copy").write_text("")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    script = f"""set -e
mount --bind {etc} /etc
mount --bind {opt} /opt
mount --bind {var_lib} /var/lib
test -f /etc/.inspectd-test-copy  # never run the install unless /etc is the copy
sh {INSTALL} --no-venv >/dev/null
runuser -u inspectd -- sh -c 'rmdir /var/lib/inspectd/journal && ln -s {victim} /var/lib/inspectd/journal'
sh {INSTALL} --no-venv && echo '--- rerun passed' || echo "--- rerun exit $?"
"""
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert "--- rerun exit 2" in result.stdout, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"install.sh: /var/lib/inspectd/journal: a symbolic link (to {victim}), expected a directory; put what it "
        "names in its place and rerun"
    )
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)


@pytest.mark.skipif(_namespace_reason() is not None, reason=str(_namespace_reason()))
def test_a_prefix_install_as_root_checks_its_configs_as_root_where_this_machine_has_a_service_user(tmp_path):
    """A --prefix tree (an image) is never chowned and no unit of this machine runs its configs: its checks, run as
    root, must not also load them as this machine's inspectd, who cannot read them (every config refused by old
    and new alike, a warning per unit). Run in a private mount namespace over a copy of /etc that has the user; the
    venv's inspectd is this checkout's."""
    etc = tmp_path / "etc"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True, timeout=60)
    (etc / ".inspectd-test-copy").write_text("")
    root = tmp_path / "image"
    venv = root / "opt" / "inspectd" / "venv"
    _pip_log_venv(venv)
    (venv / "bin" / "inspectd").write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m inspectd "$@"\n')
    (venv / "bin" / "inspectd").chmod(0o755)
    config = root / "etc" / "inspectd" / "line2.yaml"
    config.parent.mkdir(parents=True)
    line2 = {
        "station": "line2",
        "model": {"bundle": str(write_grey_bundle(tmp_path / "bundle"))},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
    }
    config.write_text(yaml.safe_dump(line2))
    _enable(root, "inspectd@line2.service")
    script = f"""set -e
mount --bind {etc} /etc
test -f /etc/.inspectd-test-copy  # never add a user unless /etc is the copy
getent passwd inspectd >/dev/null || useradd --system --no-create-home inspectd
sh {INSTALL} --prefix {root}
"""
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1] == (
        "install.sh: done; to run the new version: systemctl try-restart inspectd@line2.service"
    )


def test_regenerated_constraints_keep_the_pins_of_what_is_not_installed_here(tmp_path):
    """`make constraints` on a CPU machine must not drop the onnxruntime-gpu pin GPU stations install by, nor keep
    the pin of a package this environment has but no longer needs."""
    old = tmp_path / "constraints.txt"
    old.write_text("# header\nonnxruntime-gpu==1.31.1\nnot-a-real-package-xyz==0.1  # a comment\npip==1.0\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "freeze_constraints.py"), "--extras", "train,test,plc", "--keep", old],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    pins = dict(line.split("==") for line in out.stdout.splitlines() if "==" in line)
    assert pins["onnxruntime-gpu"] == "1.31.1" and pins["not-a-real-package-xyz"] == "0.1"
    assert "pip" not in pins  # installed here, required by nothing: dropped as it would be without --keep
    assert pins["numpy"] == __import__("importlib.metadata").metadata.version("numpy")
    assert "onnxruntime-gpu==1.31.1: not installed here, kept from" in out.stderr


def test_the_bridge_unit_restarts_a_bridge_whose_plc_is_away_without_ever_giving_up(tmp_path):
    """The bridge exits 1 when its PLC cannot be reached (a PLC reboot, a program download), the unit restarts it;
    a start limit would count those restarts and, after five inside the interval, leave the line without verdicts
    until someone ran `systemctl reset-failed`. Here the bridge's exit status for an unreachable PLC, then the unit's
    answer to it: restarted, without a start limit, with a pause between tries."""
    closed_port = 1  # nothing listens there (below 1024, and no test binds it)
    config = tmp_path / "bridge.yaml"
    config.write_text("request_timeout_ms: 500\n")
    command = [sys.executable, "-m", "inspectd", "bridge", "modbus", "--endpoint", f"ipc://{tmp_path}/pub.sock"]
    command += ["--plc", f"127.0.0.1:{closed_port}", "--config", str(config), "--topic", "inspect.s.cam0."]
    command += ["--state-dir", str(tmp_path / "state")]
    away = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert away.returncode == 1, away.stderr
    assert away.stderr.strip().splitlines()[-1].startswith("inspectd bridge: PLC"), away.stderr
    unit = _unit("inspectd-bridge@.service")
    assert unit["Restart"] == ["on-failure"] and "RestartPreventExitStatus" not in unit
    assert unit["StartLimitIntervalSec"] == ["0"] and "StartLimitBurst" not in unit
    assert float(unit["RestartSec"][0]) >= 1  # not a busy loop against a PLC that is down


def _seconds(unit: str, key: str) -> float:
    return float(_unit(unit)[key][0])


@pytest.mark.parametrize("unit", DAEMON_UNITS)
def test_the_units_stop_timeout_holds_the_longest_shutdown_the_config_accepts(unit):
    """systemd SIGKILLs a stop after TimeoutStopSec: a shutdown_timeout_s the config accepts must fit in it with what
    the daemon's stop takes past that deadline (service.py: the publish grace twice, the PUB socket's linger; then
    the archive, control and metrics stops, the engine's teardown and the interpreter's exit), or the drain of
    accepted frames is cut off half-way. The example says the pair as it is."""
    from inspectd.daemon.config import MAX_SHUTDOWN_TIMEOUT_S
    from inspectd.daemon.service import ENGINE_CLOSE_GRACE_S, PUB_LINGER_MS, PUBLISH_GRACE_S, RELOAD_GRACE_S

    stop = _seconds(unit, "TimeoutStopSec")
    # The reload grace holds the graces before it; the engines' close and the interpreter's exit come after it.
    past_deadline = max(2 * PUBLISH_GRACE_S + PUB_LINGER_MS / 1000 + 10, RELOAD_GRACE_S) + ENGINE_CLOSE_GRACE_S + 5
    assert stop >= MAX_SHUTDOWN_TIMEOUT_S + past_deadline, (stop, MAX_SHUTDOWN_TIMEOUT_S)
    example = (REPO / "deploy" / "inspectd.example.yaml").read_text()
    assert f"at most {MAX_SHUTDOWN_TIMEOUT_S:g}: the units' TimeoutStopSec={stop:g}" in example


def test_a_refused_config_is_not_retried_and_a_failed_start_is_retried_at_a_sane_pace(tmp_path):
    """`inspectd run` as the units start it, for real: a config it refuses (which no retry can fix) must exit with a
    status the units do not restart on; a start that fails on a bind (an address not there yet after a power cut)
    with one they do, slowly enough that a cause clearing within minutes is still caught before the start limit."""
    bundle = write_grey_bundle(tmp_path / "bundle")
    port = free_port()
    config = {
        "station": "line1",
        "model": {"bundle": str(bundle)},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
        "publish": {"endpoint": f"tcp://127.0.0.1:{port}"},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "line1.yaml"

    def run(doc: dict) -> subprocess.CompletedProcess:
        path.write_text(yaml.safe_dump(doc))
        command = [sys.executable, "-m", "inspectd", "run", "--config", str(path)]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)

    refused = run({**config, "station": "Line 1"})
    assert refused.stderr.startswith("inspectd run: station: "), refused.stderr
    with socket.socket() as holder:  # the port is taken: ZeroMQ's bind fails as on a missing address
        holder.bind(("127.0.0.1", port))
        holder.listen()
        unbound = run(config)
    assert unbound.returncode not in (0, refused.returncode), unbound.stderr
    assert f"publish.endpoint 'tcp://127.0.0.1:{port}': cannot bind" in unbound.stderr, unbound.stderr
    for unit in DAEMON_UNITS:
        settings = _unit(unit)
        assert settings["Restart"] == ["on-failure"]
        assert settings["RestartPreventExitStatus"] == [str(refused.returncode)], unit
        restart, burst = _seconds(unit, "RestartSec"), int(settings["StartLimitBurst"][0])
        interval = _seconds(unit, "StartLimitIntervalSec")
        assert restart >= 5, unit  # not a busy loop against a cause that takes minutes to clear
        assert (burst - 1) * restart >= 240 and interval >= (burst - 1) * restart, unit  # minutes, not seconds
        # READY=1 comes after the bundle is verified and the engine opened and warmed up: minutes on a GPU station.
        assert _seconds(unit, "TimeoutStartSec") >= 180, unit


def test_stopping_the_single_unit_leaves_the_runtime_directory_of_a_running_instance():
    """systemd removes a unit's RuntimeDirectory on stop, with what is in it: the single unit's /run/inspectd is
    the parent of each instance's /run/inspectd/NAME, whose ipc sockets a restart of inspectd must not take away.
    The single unit keeps the documented /run/inspectd/pub.sock (docs/PLC.md, the bridge unit)."""
    single = _unit("inspectd.service")
    parent = Path("/run") / single["RuntimeDirectory"][0]
    instance = Path("/run") / _unit("inspectd@.service")["RuntimeDirectory"][0].replace("%i", "line2")
    assert parent == Path("/run/inspectd") and instance.is_relative_to(parent)
    assert single.get("RuntimeDirectoryPreserve") == ["yes"]
    assert "ipc:///run/inspectd/pub.sock" in (REPO / "systemd" / "inspectd-bridge@.service").read_text()


def _offline_python(path: Path, base: str, deps: str) -> Path:
    """An interpreter for install.sh's --python that runs `base`, and makes each virtualenv it creates able to build
    and run inspectd without a network: pip finds no index here, so the venv takes the test environment's
    packages (setuptools for the build, numpy, onnxruntime, ... for `inspectd run --check`) through a .pth file, its
    own older setuptools removed. Everything else (venv, pip, the build, the install) runs for real."""
    path.write_text(
        f"""#!/bin/sh
case "$1 $2" in
"-m venv") {base} "$@" || exit
    for venv; do :; done
    "$venv/bin/python" -m pip uninstall -q -y setuptools
    echo {deps} > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/test-deps.pth"
    ;;
*) exec {base} "$@" ;;
esac
"""
    )
    path.chmod(0o755)
    return path


def _offline_install(root: Path, src: Path, python: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PIP_NO_BUILD_ISOLATION": "0"}
    command = ["sh", str(src / "deploy" / "install.sh"), "--prefix", str(root), "--python", str(python)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _source_copy(dest: Path) -> Path:
    """The project's files (tracked, and new ones not ignored) as a fresh source tree, without any build output."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _git_commit(src: Path, message: str, init: bool = False) -> None:
    """Commits every file of src, as a checkout the operator installs from; init makes it a repository first."""
    if init:
        subprocess.run(["git", "init", "-q", str(src)], check=True, timeout=60)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(src)]
    subprocess.run([*git, "add", "-A"], check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "-m", message], check=True, timeout=60)


def _site_packages(venv: Path) -> Path:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return Path(out.stdout.strip())


def _deps() -> str:
    return sysconfig.get_paths()["purelib"]


def _base_python() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def test_an_upgrade_builds_a_copy_of_the_checkout_and_checks_the_enabled_units_configs(tmp_path):
    """install.sh's pip path for real, twice, from a git checkout: pip must build a copy, never the checkout (as root
    it left root-owned build/ and egg-info there, and setuptools' build/lib shipped a module deleted from the
    source); and an upgrade runs the old and the new version's `run --check` on the config of each enabled unit,
    failing on one the old version accepted and the new one refuses, saying how to restart the units otherwise."""
    src = _source_copy(tmp_path / "src")
    (src / "inspectd" / "deleted_later.py").write_text("")
    config_py = src / "inspectd" / "daemon" / "config.py"
    v2_config_py = config_py.read_text()
    v1_config_py = v2_config_py.replace("\nMAX_SHUTDOWN_TIMEOUT_S = 60\n", "\nMAX_SHUTDOWN_TIMEOUT_S = 3600\n")
    assert v1_config_py != v2_config_py  # v1 accepts a shutdown_timeout_s that v2 refuses
    config_py.write_text(v1_config_py)
    _git_commit(src, "v1", init=True)

    root = tmp_path / "root"
    etc = root / "etc" / "inspectd"
    etc.mkdir(parents=True)
    line2 = {
        "station": "line2",
        "model": {"bundle": str(write_grey_bundle(tmp_path / "bundle"))},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
    }
    (etc / "line2.yaml").write_text(yaml.safe_dump(line2))
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "inspectd@line2.service").symlink_to("../inspectd@.service")  # systemctl enable inspectd@line2
    python = _offline_python(tmp_path / "python3", _base_python(), _deps())
    venv = root / "opt" / "inspectd" / "venv"

    def untracked() -> str:  # build output left in the checkout, ignored or not
        status = ["git", "-C", str(src), "status", "--porcelain", "--ignored"]
        return subprocess.run(status, capture_output=True, text=True, check=True, timeout=60).stdout

    first = _offline_install(root, src, python)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (_site_packages(venv) / "inspectd" / "deleted_later.py").is_file()
    assert untracked() == ""
    last = first.stdout.strip().splitlines()[-1]
    assert last == "install.sh: done; to run the new version: systemctl try-restart inspectd@line2.service"

    (src / "inspectd" / "deleted_later.py").unlink()
    config_py.write_text(v2_config_py)
    _git_commit(src, "v2")
    (etc / "line2.yaml").write_text(yaml.safe_dump({**line2, "shutdown_timeout_s": 600}))  # v1 runs with it
    upgrade = _offline_install(root, src, python)
    assert upgrade.returncode == 1, upgrade.stdout + upgrade.stderr
    assert not (_site_packages(venv) / "inspectd" / "deleted_later.py").exists()
    assert untracked() == ""
    refusal = upgrade.stderr.splitlines()[0]
    assert refusal.startswith(
        f"install.sh: inspectd@line2.service ({etc / 'line2.yaml'}): the new version refuses this config, which the "
        "old one accepted: inspectd run --check: shutdown_timeout_s: expected at most 60, got 600. The unit keeps "
    ), upgrade.stderr
    assert upgrade.stderr.splitlines()[-1].endswith("then systemctl try-restart inspectd@line2.service")


def test_python_naming_another_interpreter_makes_the_venv_again_and_a_plain_copy_leaves_build_output_behind(
    tmp_path,
):
    """--python is honoured on an existing venv (pip cannot move one between interpreters), and without --python the
    venv is kept. A source tree without git is copied without what a build left in it: a stale build/lib module is
    not shipped."""
    other = "/usr/bin/python3.11"
    if not os.path.exists(other) or os.path.realpath(other) == _base_python():
        pytest.skip("needs a second Python 3.11 interpreter beside the test's own")
    src = _source_copy(tmp_path / "src")
    stale = src / "build" / "lib" / "inspectd" / "stale_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    root = tmp_path / "root"
    venv = root / "opt" / "inspectd" / "venv"

    def made_by() -> str:
        cfg = (venv / "pyvenv.cfg").read_text()
        return next(line.split("=", 1)[1].strip() for line in cfg.splitlines() if line.startswith("home"))

    first = _offline_install(root, src, _offline_python(tmp_path / "other", other, _deps()))
    assert first.returncode == 0, first.stdout + first.stderr
    assert made_by() == str(Path(other).parent)
    assert not (_site_packages(venv) / "inspectd" / "stale_module.py").exists()
    assert not (src / "inspectd.egg-info").exists()
    ours = _offline_install(root, src, _offline_python(tmp_path / "ours", _base_python(), _deps()))
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert made_by() == str(Path(_base_python()).parent)
    version = subprocess.run([str(venv / "bin" / "inspectd"), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("inspectd "), version.stderr


def _stub_venv(venv: Path) -> None:
    """A virtualenv whose pip "installs" by swapping the old version's `inspectd` for the new one's and listing the
    source tree it was given (in built-from.txt), and whose `inspectd run --check` of version V refuses a config that
    names refused-by-V. What install.sh decides from the checks, and what it gives pip, is tested without a build;
    the real pip runs above cover the rest."""
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for version in ("old", "new"):
        (venv / f"inspectd-{version}").write_text(
            f"""#!/bin/sh
for config; do :; done
[ -f "$config" ] || {{ echo "inspectd run: $config: cannot read it" >&2; exit 2; }}
if grep -q refused-by-{version} "$config"; then echo "inspectd run: station: refused by {version}" >&2; exit 2; fi
"""
        )
    (bin_dir / "python").write_text(
        f"""#!/bin/sh
case "$*" in
"-m pip --version") exit 0 ;;
"-m pip install "*)
    for src; do :; done
    (cd "$src" && find . -type f) | LC_ALL=C sort > "{venv}/built-from.txt"
    cp "{venv}/inspectd-new" "{bin_dir}/inspectd"
    exit 0 ;;
esac
exec "{sys.executable}" "$@"
"""
    )
    (bin_dir / "python").chmod(0o755)


def _stub_upgrade(root: Path, install: Path) -> subprocess.CompletedProcess:
    """install.sh over the stub virtualenv with the old version in it."""
    venv = root / "opt" / "inspectd" / "venv"
    shutil.copy(venv / "inspectd-old", venv / "bin" / "inspectd")
    (venv / "bin" / "inspectd").chmod(0o755)
    (venv / ".inspectd-stamp").unlink(missing_ok=True)
    return subprocess.run(
        ["sh", str(install), "--prefix", str(root)], capture_output=True, text=True, timeout=60, cwd=root.parent
    )


def _enable(root: Path, *units: str) -> None:
    """systemctl enable, as the links it makes."""
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in units:
        (wants / unit).symlink_to("../inspectd@.service")


def test_an_upgrade_fails_only_on_a_config_the_old_version_accepted_and_warns_of_the_others(tmp_path):
    """A unit refused by the version before the upgrade as well, or one whose config was never written (enabled
    ahead of it), cannot start with either version: a warning, not a failed install that stops the automation
    running it. A config the old version accepted and the new one refuses is a unit that runs until its next
    restart and then stays down: the install fails, and says so."""
    root = tmp_path / "root"
    etc = root / "etc" / "inspectd"
    etc.mkdir(parents=True)
    (etc / "line2.yaml").write_text("station: line2  # refused-by-new\n")
    (etc / "line3.yaml").write_text("station: line3  # refused-by-old, refused-by-new\n")
    _stub_venv(root / "opt" / "inspectd" / "venv")
    line3 = f"install.sh: WARNING: inspectd@line3.service ({etc / 'line3.yaml'}) cannot start with this config, and "
    line3 += "could not before this install either: inspectd run: station: refused by new"
    line4 = f"install.sh: WARNING: inspectd@line4.service: no config at {etc / 'line4.yaml'}, not checked; the unit "
    line4 += "cannot start until it is written"

    _enable(root, "inspectd@line3.service", "inspectd@line4.service")
    warned = _stub_upgrade(root, INSTALL)
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert warned.stderr.splitlines() == [line3, line4]
    assert warned.stdout.splitlines()[-1] == (
        "install.sh: done; to run the new version: systemctl try-restart inspectd@line3.service inspectd@line4.service"
    )

    _enable(root, "inspectd@line2.service")
    refused = _stub_upgrade(root, INSTALL)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [
        f"install.sh: inspectd@line2.service ({etc / 'line2.yaml'}): the new version refuses this config, which the "
        "old one accepted: inspectd run: station: refused by new. The unit keeps running the old code until it is "
        "restarted, and its next restart (watchdog, crash, reboot) will be refused and not retried "
        "(RestartPreventExitStatus=2): fix the config before anything restarts it",
        line3,
        line4,
        "install.sh: installed, but the new version refuses a config the old one accepted (above): fix it, check it "
        f"with {root / 'opt/inspectd/venv/bin/inspectd'} run --check --config FILE, then systemctl try-restart "
        "inspectd@line2.service inspectd@line3.service inspectd@line4.service",
    ]

    # Run again as it is (the venv now holds the version that refuses): still a failed install, not "nothing to do"
    # nor a warning, until the config is fixed.
    again = subprocess.run(
        ["sh", str(INSTALL), "--prefix", str(root)], capture_output=True, text=True, timeout=60, cwd=root.parent
    )
    assert again.returncode == 1 and again.stderr.splitlines()[0] == refused.stderr.splitlines()[0], again.stderr
    (etc / "line2.yaml").write_text("station: line2\n")
    fixed = subprocess.run(
        ["sh", str(INSTALL), "--prefix", str(root)], capture_output=True, text=True, timeout=60, cwd=root.parent
    )
    assert fixed.returncode == 0 and fixed.stderr.splitlines() == [line3, line4], fixed.stderr

    # An old version that cannot check at all (a venv a Python upgrade broke) is no proof the config was refused
    # before: a refusal by the new one fails the install.
    (etc / "line2.yaml").write_text("station: line2  # refused-by-new\n")
    venv = root / "opt" / "inspectd" / "venv"
    (venv / "inspectd-old").write_text("#!/bin/sh\necho 'python3.11: not found' >&2\nexit 127\n")
    broken = _stub_upgrade(root, INSTALL)
    assert broken.returncode == 1 and "which the old one accepted" in broken.stderr, broken.stderr


def _pip_log_venv(venv: Path, log: Path | None = None) -> Path:
    """A virtualenv whose pip only writes down each command it is given (in pip.log, or `log`: returned) and, for
    onnxruntime-gpu, leaves or removes its dist-info folder as pip would; onnxruntime-gpu's CUDA provider "is there".
    A command naming $PIP_FAILS_ON fails, as one that reaches no index. Anything else runs on this test's Python."""
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    log = log or venv / "pip.log"
    (bin_dir / "python").write_text(
        f"""#!/bin/sh
case "$*" in
"-m pip --version") exit 0 ;;
"-m pip "*) shift 2; echo "$*" >> "{log}"
    if [ -n "${{PIP_FAILS_ON:-}}" ]; then
        case "$*" in *"$PIP_FAILS_ON"*) echo "ERROR: No matching distribution found" >&2; exit 1 ;; esac
    fi
    case "$*" in
    "install "*onnxruntime-gpu*) mkdir -p "{site}/onnxruntime_gpu-1.32.0.dist-info" ;;
    "uninstall "*onnxruntime-gpu*) rm -rf "{site}/onnxruntime_gpu-1.32.0.dist-info" ;;
    esac
    exit 0 ;;
*CUDAExecutionProvider*) exit 0 ;;
esac
exec "{sys.executable}" "$@"
"""
    )
    (bin_dir / "python").chmod(0o755)
    return log


def _pip_commands(log: Path, start: int = 0) -> list[str]:
    """The pip commands in log from line `start`, with the quiet flag, the constraints file and the throwaway source
    copy's path (SRC) taken out."""
    commands = []
    for line in log.read_text().splitlines()[start:] if log.exists() else []:
        words = [word for word in line.split() if word != "-q"]
        if "-c" in words:
            del words[words.index("-c") : words.index("-c") + 2]
        commands.append(" ".join(re.sub(r"^/\S*/src(\[|$)", r"SRC\1", word) for word in words))
    return commands


def test_a_rerun_takes_the_options_of_the_last_install_again_unless_told_to_leave_one_out(tmp_path):
    """A GPU station updated with a bare `install.sh`: the CPU onnxruntime must not come back over onnxruntime-gpu.
    The options are kept beside the venv and taken again, in one line saying so; --without-gpu leaves the GPU build
    out on purpose (and takes it out of the venv). A venv holding onnxruntime-gpu whose kept options have no
    --with-gpu is refused without --with-gpu or --without-gpu, naming the CUDA its build is for."""
    root = tmp_path / "root"
    venv = root / "opt" / "inspectd" / "venv"
    log = _pip_log_venv(venv)
    gpu_dist = next((venv / "lib").glob("python*/site-packages")) / "onnxruntime_gpu-1.32.0.dist-info"

    def install(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(INSTALL), "--prefix", str(root), *args], capture_output=True, text=True, timeout=60
        )

    gpu_install = [
        "install SRC[plc,gpu-cu13]",
        "uninstall -y onnxruntime onnxruntime-gpu",
        "install onnxruntime-gpu[cuda,cudnn]",
    ]
    first = install("--with-gpu", "cu13", "--with-plc")
    assert first.returncode == 0, first.stdout + first.stderr
    assert _pip_commands(log) == gpu_install
    assert (root / "opt/inspectd/install-options").read_text() == "--with-plc\n--with-gpu cu13\n"

    reusing = "install.sh: reusing the last install's options: --with-plc --with-gpu cu13 "
    reusing += "(--without-plc, --without-gpu to leave out)"
    (venv / ".inspectd-stamp").unlink()  # the source changed (git pull): pip runs again
    update = install()
    assert update.returncode == 0, update.stdout + update.stderr
    assert update.stdout.splitlines()[0] == reusing
    assert _pip_commands(log, 3) == gpu_install and gpu_dist.is_dir()

    again = install()
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines() == [reusing, f"install.sh: nothing to do, {root} is up to date"]
    assert _pip_commands(log, 6) == []

    both = install("--with-gpu", "cu13", "--without-gpu")
    assert both.returncode == 2 and both.stderr == "install.sh: --with-gpu and --without-gpu: expected one of them\n"

    cpu = install("--without-gpu")
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    assert cpu.stdout.splitlines()[0] == (
        "install.sh: reusing the last install's options: --with-plc (--without-plc to leave out)"
    )
    assert _pip_commands(log, 6) == ["uninstall -y onnxruntime onnxruntime-gpu", "install SRC[plc]"]
    assert not gpu_dist.exists() and (root / "opt/inspectd/install-options").read_text() == "--with-plc\n"

    # onnxruntime-gpu put in by hand, the kept options without it: the build it should be is the operator's to say.
    gpu_dist.mkdir()
    unkept = install()
    assert unkept.returncode == 2, unkept.stdout + unkept.stderr
    assert unkept.stderr.splitlines() == [
        f"install.sh: {venv} holds onnxruntime-gpu 1.32.0, built for CUDA 13, and neither this run nor the options "
        f"kept in {root / 'opt/inspectd/install-options'} have --with-gpu, which would put the CPU onnxruntime over "
        "it: give --with-gpu cu13 to keep it, or --without-gpu for the CPU build"
    ]
    assert _pip_commands(log, 8) == []


@pytest.mark.parametrize(
    ("dists", "options", "evidence", "extras"),
    [
        (["pymodbus-3.8.0"], "--with-plc", "--with-plc (pymodbus 3.8.0)", "plc"),
        (
            ["asyncua-1.1.5", "torch-2.5.1"],
            "--with-train\n--with-plc",
            "--with-train (torch 2.5.1) --with-plc (asyncua 1.1.5)",
            "train,plc",
        ),
        (
            ["pymodbus-3.8.0", "onnxruntime_gpu-1.26.0"],
            "--with-plc\n--with-gpu cu12",
            "--with-plc (pymodbus 3.8.0) --with-gpu cu12 (onnxruntime-gpu 1.26.0, built for CUDA 12)",
            "plc,gpu-cu12",
        ),
        (
            ["onnxruntime_gpu-1.27.0"],
            "--with-gpu cu13",
            "--with-gpu cu13 (onnxruntime-gpu 1.27.0, built for CUDA 13)",
            "gpu-cu13",
        ),
    ],
)
def test_a_venv_whose_install_kept_no_options_is_updated_with_the_extras_it_holds(
    tmp_path, dists, options, evidence, extras
):
    """The previous release's venv has no record: a bare update must keep what it holds (the PLC packages, torch,
    onnxruntime-gpu for the CUDA its version is built for) rather than drop them silently, and say so in one line."""
    root = tmp_path / "root"
    venv = root / "opt" / "inspectd" / "venv"
    log = _pip_log_venv(venv)
    site = next((venv / "lib").glob("python*/site-packages"))
    for dist in dists:
        (site / f"{dist}.dist-info").mkdir()
    leave_out = ", ".join(f"--without-{key}" for key in ("train", "plc", "gpu") if f"--with-{key}" in options)
    result = subprocess.run(["sh", str(INSTALL), "--prefix", str(root)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        "install.sh: reusing the last install's options, told from what its virtualenv holds (an install.sh before "
        f"this kept none): {evidence}; {leave_out} to leave out"
    )
    assert _pip_commands(log)[0].startswith(f"install SRC[{extras}]")
    assert (root / "opt" / "inspectd" / "install-options").read_text() == options + "\n"
    # What the command line gives or leaves out is not taken from the venv.
    (root / "opt" / "inspectd" / "install-options").unlink()
    (venv / ".inspectd-stamp").unlink()
    left_out = subprocess.run(
        ["sh", str(INSTALL), "--prefix", str(root), "--without-plc", "--without-train", "--without-gpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert left_out.returncode == 0, left_out.stdout + left_out.stderr
    assert "reusing" not in left_out.stdout and _pip_commands(log)[-1] == "install SRC"


def test_switching_the_cuda_major_takes_the_other_majors_wheels_out_of_the_venv_first(tmp_path):
    """A driver upgrade (cu12 -> cu13) or a station moved back: pip would leave the other CUDA's wheels installed
    beside the new ones, and both cuDNN wheels write nvidia/cudnn/lib (a cu12 -> cu13 -> cu12 station then ran cu13's
    cuDNN under nvidia-cudnn-cu12's name). They go first: the other major's NVIDIA pins, its other nvidia-*-cuNN
    wheels (torch's nccl), an onnxruntime-gpu built for it, and a torch built on them, which pip would keep."""
    url = "https://download.pytorch.org/whl/cu126"
    cases = [
        (
            ("--with-gpu", "cu13", "--without-torch-index"),
            f"--with-train\n--with-gpu cu12\n--torch-index {url}\n",
            [
                "nvidia_cudnn_cu12-9.28.0.42",
                "nvidia_cublas_cu12-12.9.3.13",
                "nvidia_nccl_cu12-2.21.5",
                "nvidia_cudnn_cu13-9.24.0.43",
                "onnxruntime_gpu-1.26.0",
                "torch-2.14.1",
                "torchvision-0.29.1",
            ],
            "nvidia-cudnn-cu12==9.1.0.70",
            [
                "uninstall -y nvidia-cublas-cu12 nvidia-cudnn-cu12 nvidia-nccl-cu12 onnxruntime-gpu torch torchvision",
                "install SRC[train,gpu-cu13]",
            ],
        ),
        (
            ("--with-gpu", "cu12", "--torch-index", url),
            "--with-train\n--with-gpu cu13\n",
            [
                "nvidia_cudnn_cu13-9.24.0.43",
                "nvidia_cuda_runtime-13.0.96",
                "nvidia_cufft-12.0.0.61",
                "nvidia_nccl_cu13-2.30.7",
                "onnxruntime_gpu-1.31.1",
                "torch-2.14.1",
                "pymodbus-3.16.1",
            ],
            'nvidia-cudnn-cu13==9.24.0.43; platform_system == "Linux"',
            [
                "uninstall -y nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-nccl-cu13 onnxruntime-gpu "
                "torch",
                f"install --index-url {url} torch torchvision",
                "install SRC[train,gpu-cu12]",
            ],
        ),
    ]
    for number, (args, kept, dists, torch_needs, pip) in enumerate(cases):
        root = tmp_path / f"root{number}"
        venv = root / "opt" / "inspectd" / "venv"
        log = _pip_log_venv(venv)
        site = next((venv / "lib").glob("python*/site-packages"))
        for dist in dists:
            (site / f"{dist}.dist-info").mkdir()
        (site / "torch-2.14.1.dist-info" / "METADATA").write_text(
            f"Name: torch\nRequires-Dist: filelock\nRequires-Dist: {torch_needs}\n"
        )
        (root / "opt" / "inspectd" / "install-options").write_text(kept)
        switch = subprocess.run(
            ["sh", str(INSTALL), "--prefix", str(root), *args], capture_output=True, text=True, timeout=60
        )
        assert switch.returncode == 0, switch.stdout + switch.stderr
        removed = pip[0].removeprefix("uninstall -y ")
        assert (
            f"install.sh: --with-gpu {args[1]}: removing what {venv} holds for the other CUDA first, which pip would "
            f"leave beside CUDA {args[1][2:]}'s (both cuDNN wheels write the same files): {removed}"
        ) in switch.stdout.splitlines(), switch.stdout
        assert _pip_commands(log)[: len(pip)] == pip

    # The same major again (what the last switch took out gone, CUDA 12's wheels in): nothing is taken out.
    for dist in ("nvidia_cudnn_cu13-9.24.0.43", "nvidia_cuda_runtime-13.0.96", "nvidia_cufft-12.0.0.61"):
        (site / f"{dist}.dist-info").rmdir()
    shutil.rmtree(site / "nvidia_nccl_cu13-2.30.7.dist-info")
    (site / "onnxruntime_gpu-1.32.0.dist-info").rename(site / "onnxruntime_gpu-1.26.0.dist-info")
    (site / "nvidia_cudnn_cu12-9.28.0.42.dist-info").mkdir()
    (venv / ".inspectd-stamp").unlink()
    rerun = subprocess.run(["sh", str(INSTALL), "--prefix", str(root)], capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _pip_commands(log, 5) == [
        f"install --index-url {url} torch torchvision",
        "install SRC[train,gpu-cu12]",
        "uninstall -y onnxruntime onnxruntime-gpu",
        "install onnxruntime-gpu[cuda,cudnn]",
    ]


def _venv_maker(path: Path, venv: Path) -> Path:
    """An interpreter for install.sh's --python whose `-m venv` makes `venv` again as a _pip_log_venv, emptied first as
    --clear does (its pip log kept beside it, in venv-pip.log); anything else runs on this test's Python."""
    template = path.parent / f"{path.name}-template"
    _pip_log_venv(venv, venv.parent / "venv-pip.log")
    shutil.copytree(venv, template, symlinks=True)
    path.write_text(
        f"""#!/bin/sh
case "$1 $2" in
"-m venv") rm -rf "{venv}" && cp -a "{template}" "{venv}" && echo "made {venv}" >> "{venv.parent}/venv-pip.log" ;;
*) exec "{sys.executable}" "$@" ;;
esac
"""
    )
    path.chmod(0o755)
    return venv.parent / "venv-pip.log"


def test_the_kept_options_outlive_a_venv_made_again_and_a_pip_run_that_failed(tmp_path):
    """The options are kept before pip runs, beside the venv: a venv that is made again (its Python gone in a distro
    upgrade) empties it first, and a pip run that then fails (no index reached) must leave the options for the bare
    retry the guide tells of, which takes them again. Without them it installed the CPU onnxruntime, exit 0."""
    root = tmp_path / "root"
    venv = root / "opt" / "inspectd" / "venv"
    log = _venv_maker(tmp_path / "python3", venv)
    python = str(tmp_path / "python3")

    def install(*args: str, fails_on: str = "") -> subprocess.CompletedProcess:
        env = {**os.environ, "PIP_FAILS_ON": fails_on}
        command = ["sh", str(INSTALL), "--prefix", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    gpu_install = [
        "install SRC[plc,gpu-cu13]",
        "uninstall -y onnxruntime onnxruntime-gpu",
        "install onnxruntime-gpu[cuda,cudnn]",
    ]
    reusing = "install.sh: reusing the last install's options: --with-plc --with-gpu cu13 "
    reusing += "(--without-plc, --without-gpu to leave out)"
    first = install("--with-gpu", "cu13", "--with-plc")
    assert first.returncode == 0, first.stdout + first.stderr
    assert _pip_commands(log) == gpu_install

    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # its interpreter is gone: the venv is made again
    failed = install("--python", python, fails_on="onnxruntime-gpu[cuda")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stdout.splitlines()[0] == reusing
    assert _pip_commands(log, 3) == [f"made {venv}", "install --upgrade pip", *gpu_install]
    retry = install()
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert retry.stdout.splitlines()[0] == reusing
    assert _pip_commands(log, 8) == gpu_install

    # No venv made again: a CPU station switched to the GPU build, whose download fails after the CPU build is gone.
    cpu = install("--without-gpu", "--without-plc")
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    switch = install("--with-gpu", "cu13", fails_on="onnxruntime-gpu[cuda")
    assert switch.returncode == 1, switch.stdout + switch.stderr
    retry = install()
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert retry.stdout.splitlines()[0] == (
        "install.sh: reusing the last install's options: --with-gpu cu13 (--without-gpu to leave out)"
    )
    assert _pip_commands(log)[-3:] == ["install SRC[gpu-cu13]", *gpu_install[1:]]

    # Where the install.sh before this kept them: in the venv. Taken from there, and kept beside it from then on.
    record = root / "opt" / "inspectd" / "install-options"
    record.rename(venv / ".inspectd-options")
    legacy = install()
    assert legacy.returncode == 0, legacy.stdout + legacy.stderr
    up_to_date = f"install.sh: nothing to do, {root} is up to date"
    assert legacy.stdout.splitlines() == [retry.stdout.splitlines()[0], up_to_date]
    assert record.read_text() == "--with-gpu cu13\n" and not (venv / ".inspectd-options").exists()


def test_the_copy_pip_builds_leaves_out_what_git_ignores_from_a_checkout_through_a_symlink_or_without_git(tmp_path):
    """A checkout holds gigabytes that git ignores (runs, bundles, datasets): the copy for pip, in mktemp's /tmp,
    must not take them, whether the checkout is reached through a symlink (whose path is not the one git names)
    or is a plain tree without git."""
    checkout = _source_copy(tmp_path / "checkout")
    _git_commit(checkout, "v1", init=True)
    (checkout / "runs").mkdir()
    (checkout / "runs" / "big.npz").write_bytes(bytes(1 << 20))
    link = tmp_path / "link"
    link.symlink_to(checkout)
    root = tmp_path / "root"
    venv = root / "opt" / "inspectd" / "venv"
    _stub_venv(venv)
    for has_git in (True, False):
        if not has_git:
            shutil.rmtree(checkout / ".git")
        result = _stub_upgrade(root, link / "deploy" / "install.sh")
        assert result.returncode == 0, result.stdout + result.stderr
        built_from = (venv / "built-from.txt").read_text().splitlines()
        assert "./inspectd/cli.py" in built_from and "./pyproject.toml" in built_from, has_git
        assert not [name for name in built_from if name.startswith(("./runs/", "./.git/"))], has_git
