"""Writing bundles: what a later writer, a kill and a power cut leave behind.

The bundles are tiny (write_bundle with a stand-in graph: nothing here runs it). A write into a bundle that was
replaced on disk since it was loaded is refused, and so is one over a file another process rewrote since (but for a
later thresholds version made from it); two writers in two processes never both pass that check; a rewrite failing at
any sync or rename says what the next load takes; a killed writer's temporary files go at the next write; a kill at
each rename of a rewrite, of a whole-bundle write and of teach's in-place swap and rollback (strace's fault injection,
in a real child process) leaves a bundle that loads, old or new; traced, every file written is fsynced before it is
renamed into place and every directory a rename changed is fsynced after; rewritten files keep the bundle's readable
mode; an unreadable manifest says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from calibration.teach import bundle_version, switch_link
from engines.bundle import store
from engines.bundle import thresholds as T
from engines.bundle.store import load_bundle, write_bundle
from engines.errors import BundleError
from other_user import as_nobody
from station_model import TEACH_RECORDED

pytestmark = [pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[1]
RENAMES = "rename,renameat,renameat2"


def make(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    thresholds = T.first_version(1.0, 0.5, {T.GOOD_SCORES: T.good_score_reference(rng.normal(0.5, 0.1, 300))})
    manifest = {
        "method": "frozen",
        "backbone": "lite0",
        "input": {"height": 8, "width": 8, "channels": 3, "resize": "stretch"},
        "scorer_inputs": ["memory_bank"],
    }
    scorer = {"memory_bank": rng.normal(size=(4, 2)).astype(np.float32)}
    return write_bundle(path, manifest, b"stand-in graph", scorer, {"w": np.zeros(2, np.float32)}, thresholds)


def next_thresholds(bundle, image_threshold: float) -> bytes:
    return T.dumps(T.next_version(bundle.thresholds(), image_threshold=image_threshold))


# --- a bundle replaced since it was loaded ----------------------------------------------------------------------


def test_a_write_into_a_bundle_replaced_in_place_since_it_was_loaded_is_refused(tmp_path):
    path = make(tmp_path / "b")
    daemon = load_bundle(path)  # what a daemon holds
    make(path, seed=1)  # teach (in place) or a new train since
    newer = load_bundle(path).model_id
    with pytest.raises(BundleError, match=r"changed on disk since it was loaded") as refused:
        daemon.replace_file(T.FILE_NAME, next_thresholds(daemon, 0.9))
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    assert load_bundle(path).model_id == newer and load_bundle(path).thresholds().version == 1


def test_a_write_through_a_link_switched_since_it_was_loaded_is_refused(tmp_path):
    make(tmp_path / "m")
    make(tmp_path / "m-v2", seed=1)
    link = tmp_path / "current"
    link.symlink_to("m")
    daemon = load_bundle(link)
    switch_link(link, tmp_path / "m-v2")  # what teach does
    with pytest.raises(BundleError, match=r"current: changed on disk since it was loaded"):
        daemon.replace_file(T.FILE_NAME, next_thresholds(daemon, 0.9))
    for name in ("m", "m-v2"):
        assert load_bundle(tmp_path / name).thresholds().version == 1


def test_thresholds_another_process_wrote_meanwhile_do_not_stop_the_next_write(tmp_path):
    """calibrate writes version 2, then --apply: the daemon, which loaded version 1, writes the same document."""
    path = make(tmp_path / "b")
    daemon = load_bundle(path)
    calibrate = load_bundle(path)
    document = next_thresholds(calibrate, 0.9)
    calibrate.replace_file(T.FILE_NAME, document)
    daemon.replace_file(T.FILE_NAME, document)
    assert load_bundle(path).thresholds().image_threshold == 0.9


@pytest.mark.parametrize("first", ["daemon", "calibrate"])
def test_thresholds_of_the_same_version_written_meanwhile_are_never_replaced_by_another_document(tmp_path, first):
    """Two writers loaded version 1 and each made a different version 2: a daemon's set-thresholds or rollback, and
    calibrate, which read version 1 before minutes of scoring. Whichever writes second is refused in one line naming
    the file and the version now there, and the first one's document stays (the old code wrote the second over it:
    the daemon judged by one version 2 while another sat on disk, with the first in no history)."""
    path = make(tmp_path / "b")
    writers = {"daemon": load_bundle(path), "calibrate": load_bundle(path)}
    documents = {name: next_thresholds(writers[name], value) for name, value in (("daemon", 5.0), ("calibrate", 0.9))}
    second = "calibrate" if first == "daemon" else "daemon"
    writers[first].replace_file(T.FILE_NAME, documents[first])
    with pytest.raises(BundleError, match=r"changed on disk since it was loaded") as refused:
        writers[second].replace_file(T.FILE_NAME, documents[second])
    message = str(refused.value)
    assert message.startswith(f"{path.resolve() / T.FILE_NAME}: ") and "\n" not in message
    assert "(now version 2, sha256 " in message
    assert message.endswith("load the bundle again (the daemon: reload) and retry")
    assert (path / T.FILE_NAME).read_bytes() == documents[first]
    assert load_bundle(path).thresholds().version == 2
    # Loaded again, it writes its next version over the one now there, which that version's history keeps.
    again = load_bundle(path)
    again.replace_file(T.FILE_NAME, next_thresholds(again, 2.0))
    assert [h["version"] for h in load_bundle(path).thresholds().history] == [2, 1]


def test_rollbacks_back_and_forth_keep_thresholds_json_bounded(tmp_path):
    """An operator toggling between two versions (`ctl rollback`, as Daemon.rollback writes it): each rollback copied
    the whole provenance of the version it went back to, its earlier rollbacks nested inside, so the document grew
    with every rollback though history keeps at most MAX_HISTORY versions (49 MB after 100 on a daemon)."""
    path = make(tmp_path / "b")
    first = (path / "thresholds.json").stat().st_size
    # Each version holds its own provenance and at most that of the version it went back to, each at most a first
    # version's (its drift reference) plus a rollback's few fields.
    bound = (T.MAX_HISTORY + 1) * 3 * first
    bundle = load_bundle(path)
    reference = bundle.thresholds().provenance[T.GOOD_SCORES]
    current = T.next_version(bundle.thresholds(), image_threshold=1.5, provenance={"tool": "ctl set_thresholds"})
    bundle.replace_file("thresholds.json", T.dumps(current))
    # Twice the history's length: the history fills, then every version in it is one written after it was full.
    rollbacks = 2 * T.MAX_HISTORY
    for n in range(1, rollbacks + 1):
        current = T.rollback(current, current.version - 1)
        size = len(T.dumps(current))
        assert size <= bound, f"rollback {n}: {size} bytes, expected at most {bound}"
        assert len(current.history) <= T.MAX_HISTORY
    load_bundle(path).replace_file("thresholds.json", T.dumps(current))
    assert (path / "thresholds.json").stat().st_size <= bound
    back = load_bundle(path).thresholds()
    assert (back.version, back.image_threshold, len(back.history)) == (rollbacks + 2, 1.5, T.MAX_HISTORY)
    # What an operator sees of the rollback: where it went back to, and that version's own provenance, which says
    # where that one came from in turn.
    assert back.provenance["rollback_to"] == rollbacks
    assert back.provenance["rolled_back_provenance"]["rollback_to"] == rollbacks - 2
    assert "rolled_back_provenance" not in back.provenance["rolled_back_provenance"]
    assert back.provenance[T.GOOD_SCORES] == reference  # the drift alarm stays armed


# --- modes and messages --------------------------------------------------------------------------------------------


def test_rewritten_files_keep_their_mode_and_new_ones_are_readable(tmp_path):
    path = make(tmp_path / "b")
    (path / T.FILE_NAME).chmod(0o640)
    bundle = load_bundle(path)
    bundle.replace_file(T.FILE_NAME, next_thresholds(bundle, 0.9))
    bundle.replace_file("engines/x.plan", b"plan", add=True)
    modes = {
        name: stat.S_IMODE((path / name).stat().st_mode) for name in ("manifest.json", T.FILE_NAME, "engines/x.plan")
    }
    assert modes == {"manifest.json": 0o644, T.FILE_NAME: 0o640, "engines/x.plan": 0o644}


def test_an_unreadable_manifest_is_reported_as_such(open_tmp_path):
    """Read by another user (root reads everything, so the child runs as nobody when this is root)."""
    root = open_tmp_path / "shared"
    root.mkdir()
    path = make(root / "b")
    (path / "manifest.json").chmod(0o600 if os.geteuid() == 0 else 0)
    load = "import sys; from engines.bundle.store import load_bundle; load_bundle(sys.argv[1])"
    out = subprocess.run(
        as_nobody([sys.executable, "-c", load, str(path)]), capture_output=True, text=True, cwd=REPO, timeout=60
    )
    last = out.stderr.strip().splitlines()[-1]
    assert re.search(r"manifest.json: cannot read \(Permission denied\)", last), out.stderr
    assert "not valid JSON" not in out.stderr


# --- kills and power cuts ------------------------------------------------------------------------------------------

# Child programs: one bundle operation each, on paths the parent made.
REWRITE = """
import sys
from engines.bundle import thresholds as T
from engines.bundle.store import load_bundle
b = load_bundle(sys.argv[1])
b.replace_file(T.FILE_NAME, T.dumps(T.next_version(b.thresholds(), image_threshold=0.9)))
"""
REWRITE_ALL = """
import sys
import numpy as np
from engines.bundle.store import load_bundle, write_bundle
b = load_bundle(sys.argv[1])
fields = {k: v for k, v in b.manifest.items() if k in ("method", "backbone", "input", "scorer_inputs")}
params = {k: v + 1 for k, v in b.scorer_params().items()}
write_bundle(sys.argv[1], fields, b.graph_path.read_bytes(), params, b.weights(), b.thresholds())
"""
TEACH = """
import sys
from calibration.teach import bundle_version, write_version
from engines.bundle import thresholds as T
from engines.bundle.store import load_bundle
b = load_bundle(sys.argv[1])
params = {k: v + 1 for k, v in b.scorer_params().items()}
thresholds = T.next_version(b.thresholds(), image_threshold=0.9)
version = bundle_version(b) + 1
write_version(b, params, thresholds, version, {"version": version, "previous_version": bundle_version(b)})
"""
ROLLBACK = """
import io, sys
from calibration.teach import rollback
rollback(sys.argv[1], out=io.StringIO())
"""


def strace() -> str:
    path = shutil.which("strace")
    assert path, "strace is not installed: `make test` installs it (apt-get install strace)"
    return path


def child(code: str, path: Path, *strace_args: str) -> subprocess.CompletedProcess:
    command = [strace(), "-o", "/dev/null", *strace_args] if strace_args else []
    return subprocess.run(
        [*command, sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def copy(path: Path, to: Path) -> Path:
    """A copy of bundle `path` at `to`, with its versions folder (teach's in-place layout) beside it."""
    shutil.copytree(path, to, symlinks=True)
    versions = path.with_name(path.name + ".versions")
    if versions.exists():
        shutil.copytree(versions, to.with_name(to.name + ".versions"))
    return to


def hidden(path: Path) -> list[str]:
    """The hidden entries in `path`: what a write left behind (temporary files, second names)."""
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


def renames_made(code: str, path: Path, scratch: Path, *strace_args: str, calls: str = RENAMES) -> dict[str, int]:
    """How many calls of each rename system call (or of each of `calls`) `code` makes on a copy of `path` (strace
    counts each apart), with `strace_args` (a fault injection) added."""
    copy(path, scratch)
    trace = scratch.with_name(scratch.name + ".trace")
    out = subprocess.run(
        [strace(), "-f", "-o", str(trace), "-e", f"trace={calls}", *strace_args]
        + [sys.executable, "-c", code, str(scratch)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    counts: dict[str, int] = {}
    for line in trace.read_text().splitlines():
        if (m := re.match(r"^\d+\s+(\w+)\(", line)) and m.group(1) in calls.split(","):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def taught_in_place(tmp_path: Path) -> Path:
    path = make(tmp_path / "taught")
    assert child(TEACH, path).returncode == 0
    return path


@pytest.mark.parametrize("operation", ["rewrite", "write_bundle", "teach", "rollback"])
def test_a_kill_at_any_rename_leaves_a_bundle_that_loads(tmp_path, operation):
    """The process is killed in place of its k-th rename, for every k: the bundle loads, with the old content or
    the new (the old code left a manifest naming the old thresholds.json beside the new one, or no bundle at all
    between two renames of a directory)."""
    code = {"rewrite": REWRITE, "write_bundle": REWRITE_ALL, "teach": TEACH, "rollback": ROLLBACK}[operation]
    original = taught_in_place(tmp_path) if operation == "rollback" else make(tmp_path / "b")
    counts = renames_made(code, original, tmp_path / "counted")
    assert counts, "no rename at all"
    for call, total in counts.items():
        for k in range(1, total + 1):
            path = copy(original, tmp_path / f"{call}-{k}")
            killed = child(code, path, "-f", "-e", f"inject={call}:error=EIO:signal=SIGKILL:when={k}")
            assert killed.returncode != 0, f"{call} {k} of {total}: not killed"
            try:
                load_bundle(path)
            except BundleError as exc:
                raise AssertionError(f"{operation}, killed at {call} {k} of {total}: {exc}") from None


def test_every_file_written_is_fsynced_before_its_rename_and_every_directory_after(tmp_path):
    """Traced: a new bundle, one over it, a thresholds rewrite, teach's linked version and in-place version and
    both rollbacks."""
    script = """
import io, os, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_bundle_writes import make
from calibration.teach import bundle_version, rollback, write_version
from engines.bundle import thresholds as T
from engines.bundle.store import load_bundle
root = Path(sys.argv[1])
make(root / "b")
make(root / "b", seed=1)
bundle = load_bundle(root / "b")
bundle.replace_file(T.FILE_NAME, T.dumps(T.next_version(bundle.thresholds(), image_threshold=0.9)))
make(root / "m")
os.symlink("m", root / "current")
for target in (root / "current", root / "b"):
    bundle = load_bundle(target)
    params = {k: v + 1 for k, v in bundle.scorer_params().items()}
    v = bundle_version(bundle) + 1
    record = {"version": v, "previous_version": v - 1}
    if target.is_symlink():
        record["previous_dir"] = target.resolve().name
    write_version(bundle, params, T.next_version(bundle.thresholds(), image_threshold=2.0), v, record)
    rollback(target, out=io.StringIO())
"""
    trace = tmp_path / "trace"
    root = tmp_path / "root"
    root.mkdir()
    out = subprocess.run(
        [strace(), "-f", "-y", "-o", str(trace), "-e", f"trace=openat,fsync,fdatasync,{RENAMES}"]
        + [sys.executable, "-c", script, str(root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    events: list[tuple] = []  # (kind, path) or ("rename", source, destination)
    for line in trace.read_text().splitlines():
        if str(root) not in line:
            continue
        if m := re.search(r'openat\([^,]*, "([^"]+)", O_WRONLY\|O_CREAT', line):
            events.append(("write", Path(m.group(1))))
        elif m := re.search(r"f(?:data)?sync\(\d+<([^>]+)>\) = 0", line):
            events.append(("fsync", Path(m.group(1))))
        elif m := re.search(r'rename\("([^"]+)", "([^"]+)"\) = 0', line):
            events.append(("rename", Path(m.group(1)), Path(m.group(2))))
        elif m := re.search(r'renameat2?\([^,]*, "([^"]+)", [^,]*, "([^"]+)"(?:, [A-Z_]+)?\) = 0', line):
            events.append(("rename", Path(m.group(1)), Path(m.group(2))))
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) >= 8, events
    wrong = []
    for i, event in enumerate(events):
        if event[0] == "write":
            upto = next((j for j in renames if j > i), len(events))
            if ("fsync", event[1]) not in events[i:upto]:
                wrong.append(f"{event[1]}: written, not fsynced before the next rename")
        elif event[0] == "rename":
            source, destination = event[1], event[2]
            # A directory filled here (write_bundle's staging) has its entries durable before it takes the name.
            filled = [j for j, e in enumerate(events[:i]) if e[0] == "write" and source in e[1].parents]
            if filled and ("fsync", source) not in events[filled[-1] : i]:
                wrong.append(f"{source}: renamed to {destination.name} before its entries were fsynced")
            if ("fsync", destination.parent) not in events[i:]:
                wrong.append(f"{destination.parent}: not fsynced after {source.name} -> {destination.name}")
    assert not wrong, "\n".join(wrong)


def test_teach_in_place_that_fails_after_the_swap_puts_the_old_version_back(tmp_path):
    """The in-place swap is one exchange and then the old version's move to BUNDLE.versions; when that move fails
    the exchange is undone, so teach's cleanup of its staging directory never deletes the version in service."""
    path = make(tmp_path / "b")
    before = load_bundle(path).model_id
    counts = renames_made(TEACH, path, tmp_path / "counted")
    if "renameat2" not in counts:
        pytest.skip("this kernel or file system cannot swap two directories in one step")
    failed = child(TEACH, path, "-f", "-e", f"inject=rename:error=EIO:when={counts['rename']}")
    assert failed.returncode != 0 and "Input/output error" in failed.stderr, failed.stderr
    after = load_bundle(path)
    assert after.model_id == before and after.manifest.get("bundle_version", 1) == 1


# --- without RENAME_EXCHANGE: two renames, all or nothing ---------------------------------------------------------

SWAPS = {"write_bundle": REWRITE_ALL, "teach": TEACH, "rollback": ROLLBACK}
# What a kernel or file system without RENAME_EXCHANGE answers. os.replace is the plain rename system call on x86-64,
# so only the exchange sees it.
NO_EXCHANGE = "inject=renameat2:error=EINVAL"
UNDONE = "; it holds what it held before$"


def swap_start(tmp_path: Path, operation: str) -> Path:
    """The bundle `operation` starts from: taught in place for a rollback, else a new one."""
    return taught_in_place(tmp_path) if operation == "rollback" else make(tmp_path / "b")


def settled(path: Path) -> tuple[str, int, list[str], list[str]]:
    """What a swap leaves: the bundle's model and version, the hidden entries beside it (staging, `.NAME.old-PID`)
    and the versions it keeps."""
    bundle = load_bundle(path)
    versions = path.with_name(path.name + ".versions")
    return (
        bundle.model_id,
        int(bundle.manifest.get("bundle_version", 1)),
        sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")),
        sorted(p.name for p in versions.iterdir()) if versions.exists() else [],
    )


def plain_renames(code: str, path: Path, scratch: Path, *strace_args: str) -> dict[str, int]:
    counts = renames_made(code, path, scratch, *strace_args)
    if "rename" not in counts:  # e.g. arm64, whose libc renames through renameat2: the injection would hit it too
        pytest.skip("os.replace does not use the rename system call here")
    return counts


@pytest.mark.parametrize("operation", list(SWAPS))
def test_without_an_exchange_a_failed_second_rename_puts_the_bundle_back(tmp_path, operation):
    """renameat2 refused (EINVAL), so the swap is two renames, and the second fails (EIO): the first is undone, the
    bundle is the one in service again with nothing left beside it, and the error is one line naming it (the old code
    left the old version only under .NAME.old-PID or BUNDLE.versions, deleted the new one, and BUNDLE did not load)."""
    code = SWAPS[operation]
    original = swap_start(tmp_path, operation)
    counts = plain_renames(code, original, tmp_path / "counted", "-e", NO_EXCHANGE)
    path = copy(original, tmp_path / "run" / original.name)
    before = settled(path)
    # The second rename of the two is each operation's last rename.
    failed = child(code, path, "-f", "-e", NO_EXCHANGE, "-e", f"inject=rename:error=EIO:when={counts['rename']}")
    assert failed.returncode != 0, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    reason = rf"\S+ -> {path.name}: Input/output error"
    assert re.search(rf"(OSError|BundleError): {re.escape(str(path))}: not replaced \({reason}\){UNDONE}", last), (
        failed.stderr
    )
    assert settled(path) == before


@pytest.mark.parametrize("operation", list(SWAPS))
def test_without_an_exchange_a_failed_undo_says_where_the_bundle_in_service_is(tmp_path, operation):
    """The second rename and the undo both fail (EIO from the second rename on): the one-line error names the
    directory the bundle in service was moved to, and it loads there (the old code named only the rename that
    failed)."""
    code = SWAPS[operation]
    original = swap_start(tmp_path, operation)
    counts = plain_renames(code, original, tmp_path / "counted", "-e", NO_EXCHANGE)
    path = copy(original, tmp_path / "run" / original.name)
    before = settled(path)
    failed = child(code, path, "-f", "-e", NO_EXCHANGE, "-e", f"inject=rename:error=EIO:when={counts['rename']}+")
    assert failed.returncode != 0, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    moved = re.search(r"could not be moved back \(Input/output error\): it is at (\S+)$", last)
    assert moved and f"{path}: not replaced (" in last, failed.stderr
    assert load_bundle(moved.group(1)).model_id == before[0]
    # Whoever loads the bundle next (a daemon starting, train, teach) is told where it is, not just that it is gone.
    aside = re.escape(moved.group(1))
    with pytest.raises(
        BundleError, match=rf"missing; a bundle write was cut off and left the previous bundle at {aside}"
    ):
        load_bundle(path)


@pytest.mark.parametrize("operation", list(SWAPS))
def test_renameat2_refused_by_a_seccomp_filter_falls_back_to_two_renames(tmp_path, operation):
    """A seccomp filter answers a system call it does not allow with EPERM (systemd's SystemCallErrorNumber=EPERM):
    the swap is then done by two renames, with the same result as the exchange (the old code raised EPERM)."""
    code = SWAPS[operation]
    original = swap_start(tmp_path, operation)
    plain_renames(code, original, tmp_path / "counted", "-e", NO_EXCHANGE)
    exchanged = copy(original, tmp_path / "exchanged" / original.name)
    assert child(code, exchanged).returncode == 0
    path = copy(original, tmp_path / "run" / original.name)
    done = child(code, path, "-f", "-e", "inject=renameat2:error=EPERM")
    assert done.returncode == 0, done.stderr
    assert settled(path) == settled(exchanged) != settled(original)


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("inject=renameat2:error=EXDEV", r"not replaced \(Invalid cross-device link\)"),
        ("inject=fsync:error=ENOSPC", r"not written \(No space left on device writing its new copy in .*\)"),
    ],
    ids=["across-file-systems", "disk-full"],
)
def test_a_bundle_write_that_fails_is_one_line_with_the_old_bundle_kept(tmp_path, fault, reason):
    """EXDEV from the exchange (two renames could not cross file systems either, so nothing is moved), or the disk
    filling while the new bundle's files are written (the fsync of the first reports ENOSPC): a BundleError naming
    the bundle, which train and teach print in one line (it was a bare OSError: a traceback at the end of a training
    run), the bundle in service untouched and no staging directory left beside it."""
    path = make(tmp_path / "run" / "b")
    before = settled(path)
    failed = child(REWRITE_ALL, path, "-f", "-e", fault)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert re.search(rf"BundleError: {re.escape(str(path))}: {reason}{UNDONE}", last), failed.stderr
    assert settled(path) == before


@pytest.mark.parametrize("undo", ["put back", "failed too"])
def test_a_rewrite_whose_manifest_cannot_be_written_is_what_it_reports(tmp_path, undo):
    """The pending manifest and the new thresholds.json are in place, then the manifest listing it fails (ENOSPC on
    its rename, the third): the old content is put back and the error says not written, so the next load takes the
    old version (the old code raised a bare OSError, which the daemon and calibrate report as not written, yet the
    pending checksum made the next load take the new version). When putting it back fails too (ENOSPC from the
    third rename on), the one-line error says the next load takes the new content, and it does."""
    original = make(tmp_path / "b")
    counts = plain_renames(REWRITE, original, tmp_path / "counted")
    assert counts["rename"] == 3, counts  # the pending manifest, the file, the manifest listing it
    path = copy(original, tmp_path / "run" / "b")
    when = "3" if undo == "put back" else "3+"
    failed = child(REWRITE, path, "-f", "-e", f"inject=rename:error=ENOSPC:when={when}")
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    member = re.escape(str(path.resolve() / T.FILE_NAME))
    reason = r"\(No space left on device writing manifest.json\)"
    if undo == "put back":
        assert re.search(rf"BundleError: {member}: not written {reason}{UNDONE}", last), failed.stderr
        assert load_bundle(path).thresholds().version == 1
    else:
        assert re.search(
            rf"BundleError: {member}: written, but manifest.json could not list it {reason} and the old content "
            r"could not be put back \(No space left on device\): the next load of the bundle takes the new content$",
            last,
        ), failed.stderr
        assert load_bundle(path).thresholds().version == 2
    assert hidden(path) == []


def test_a_rewrite_that_fails_at_any_sync_or_rename_says_what_the_next_load_takes(tmp_path):
    """EIO from each fsync and each rename of a rewrite in turn (a failing disk): the error is one line naming the
    file, and the next load takes what it says. Only the sync after the manifest's last rename leaves the new
    version (written, not yet durable); everywhere before, the old one is put back (the old code put it back there
    too, under a manifest already listing the new checksum, so the bundle no longer loaded; and after the sync of the
    file's rename it raised a bare OSError, reported as not written, while the next load took the new version)."""
    original = make(tmp_path / "b")
    counts = plain_renames(REWRITE, original, tmp_path / "counted-renames")
    counts |= renames_made(REWRITE, original, tmp_path / "counted-fsyncs", calls="fsync")
    # Each write: its temporary file synced, renamed, its directory synced: the pending manifest, the file, the
    # manifest listing it.
    assert counts == {"rename": 3, "fsync": 6}, counts
    outcomes = {}
    for call, total in counts.items():
        for k in range(1, total + 1):
            path = copy(original, tmp_path / f"{call}-{k}" / "b")
            failed = child(REWRITE, path, "-f", "-e", f"inject={call}:error=EIO:when={k}")
            assert failed.returncode != 0, f"{call} {k}: did not fail"
            last = failed.stderr.strip().splitlines()[-1]
            member = re.escape(str(path.resolve() / T.FILE_NAME))
            reason = r"\(Input/output error writing (?:manifest|thresholds)\.json\)"
            said = re.fullmatch(
                rf"engines\.errors\.BundleError: {member}: (not written) {reason}; it holds what it held before"
                rf"|engines\.bundle\.store\.NotDurable: {member}: (written), but it may not be on disk yet {reason}: a "
                "power cut before the system writes it out could bring back the old content",
                last,
            )
            assert said, f"{call} {k}: {failed.stderr}"
            outcome = said.group(1) or said.group(2)
            try:
                version = load_bundle(path).thresholds().version
            except BundleError as exc:
                raise AssertionError(f"{call} {k}: {outcome}, yet the bundle does not load: {exc}") from None
            assert version == (1 if outcome == "not written" else 2), f"{call} {k}: {last}"
            assert hidden(path) == [], f"{call} {k}"
            outcomes[f"{call} {k}"] = outcome
    assert [at for at, outcome in outcomes.items() if outcome != "not written"] == ["fsync 6"], outcomes


def test_a_calibration_written_without_apply_is_followed_by_the_next_version_from_it(tmp_path):
    """calibrate without --apply wrote version 2 while the daemon runs version 1; calibrate --apply then computes
    version 3 from the version on disk, and the daemon writes it: its history holds that version 2, so no version
    number names two documents (the old code refused it until a reload, which put the unapplied version 2 on the line
    first). A version 2 of the daemon's own is refused, and so is a version 3 whose history holds a version 2 other
    than the one on disk."""
    path = make(tmp_path / "b")
    daemon = load_bundle(path)
    running = daemon.thresholds()  # what the daemon judges by (the file is read again at each call)
    calibrate = load_bundle(path)
    calibrate.replace_file(T.FILE_NAME, next_thresholds(calibrate, 0.9))
    own_v2 = T.next_version(running, image_threshold=5.0)
    for document in (own_v2, T.next_version(own_v2, image_threshold=6.0)):
        with pytest.raises(BundleError, match=r"changed on disk since it was loaded \(now version 2, ") as refused:
            daemon.replace_file(T.FILE_NAME, T.dumps(document))
        expected = "expected the content loaded, or a later version whose history holds the one there: "
        assert expected in str(refused.value) and "\n" not in str(refused.value)
        assert load_bundle(path).thresholds().image_threshold == 0.9
    applied = next_thresholds(load_bundle(path), 0.95)
    daemon.replace_file(T.FILE_NAME, applied)
    after = load_bundle(path).thresholds()
    assert (after.version, after.image_threshold) == (3, 0.95)
    assert [(h["version"], h["image_threshold"]) for h in after.history] == [(2, 0.9), (1, 1.0)]
    daemon.replace_file(T.FILE_NAME, next_thresholds(daemon, 0.8))  # it loaded version 3 by writing it
    assert load_bundle(path).thresholds().version == 4


def held_up_rewrite(path: Path) -> subprocess.Popen:
    """A thresholds rewrite of `path` in a process of its own, its first rename held up 2 s by strace; returned once
    its pending manifest is written (it holds the bundle's write lock then), not yet renamed."""
    writer = subprocess.Popen(
        [strace(), "-f", "-o", "/dev/null", "-e", f"inject={RENAMES}:delay_enter=2000000:when=1"]
        + [sys.executable, "-c", REWRITE, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 30
    while not list(path.glob(".manifest.json.*.tmp")):
        if writer.poll() is not None or time.monotonic() > deadline:
            writer.kill()
            raise AssertionError(f"the writer never began its write: {writer.communicate()[1]}")
        time.sleep(0.01)
    return writer


def test_two_writers_of_one_version_in_two_processes_never_both_succeed(tmp_path):
    """calibrate (a real process) is held up in its write, its first rename delayed by strace, while the daemon,
    which loaded the same version 1, writes a different version 2: the daemon waits for calibrate's write to end, then
    is refused, and calibrate's document is on disk (the old code let both pass the check: both returned normally,
    calibrate's document landed over the daemon's, and the daemon judged by a version 2 that was not on disk)."""
    path = make(tmp_path / "b")
    daemon = load_bundle(path)
    calibrate = held_up_rewrite(path)
    try:
        with pytest.raises(BundleError, match=r"changed on disk since it was loaded \(now version 2, "):
            daemon.replace_file(T.FILE_NAME, next_thresholds(daemon, 5.0))
    finally:
        _, err = calibrate.communicate(timeout=60)
    assert calibrate.returncode == 0, err
    assert load_bundle(path).thresholds().image_threshold == 0.9


def test_teach_swapping_a_version_in_waits_for_a_write_under_way_into_the_old_one(tmp_path):
    """A daemon's thresholds write (a real process, its first rename delayed by strace) is under way when teach
    swaps the taught version in place: the swap waits for the write, which lands in the version taught from, and the
    taught version at BUNDLE loads (the swap taking no lock let the write go by path into the taught version, whose
    manifest and files it then no longer matched)."""
    from calibration.teach import swap_in

    path = make(tmp_path / "b")
    taught = make(tmp_path / ".b.teach-1", seed=1)
    writer = held_up_rewrite(path)
    try:
        swap_in(path, taught, tmp_path / "b.versions-v1")
    finally:
        _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert (
        load_bundle(path).thresholds().version == 1
        and load_bundle(path).model_id != load_bundle(tmp_path / "b.versions-v1").model_id
    )
    assert load_bundle(tmp_path / "b.versions-v1").thresholds().image_threshold == 0.9


def test_a_writer_held_up_by_another_past_the_wait_is_refused_in_one_line(tmp_path, monkeypatch):
    """Another process holds the bundle's write lock (a writer stopped mid-write): a daemon's write gives up after
    LOCK_WAIT_S with a one-line error naming the bundle rather than blocking its control thread for good, and
    writes once the lock is free."""
    path = make(tmp_path / "b")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    monkeypatch.setattr(store, "LOCK_WAIT_S", 0.5)
    bundle = load_bundle(path)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            BundleError,
            match=r"another process is writing into this bundle \(build-engine, teach, calibrate\), still after 0.5 s",
        ) as refused:
            bundle.replace_file(T.FILE_NAME, next_thresholds(bundle, 0.9))
        assert str(refused.value).startswith(f"{path.resolve()}: ") and "\n" not in str(refused.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    bundle.replace_file(T.FILE_NAME, next_thresholds(bundle, 0.9))
    assert load_bundle(path).thresholds().version == 2


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A writer killed at the file's rename leaves its second name for the old content (.old) and the new content
    (.tmp); the next write into the bundle removes them, and an older writer's (no kind) in a subfolder too, but not
    those of a process still running (the old code left them for good)."""
    path = make(tmp_path / "b")
    bundle = load_bundle(path)
    bundle.replace_file("engines/x.plan", b"plan", add=True)
    killed = child(REWRITE, path, "-f", "-e", "inject=rename:error=EIO:signal=SIGKILL:when=2")
    assert killed.returncode != 0
    left = hidden(path)
    kinds = [re.fullmatch(r"\.thresholds\.json\.(\d+)-[0-9a-f]{8}\.(old|tmp)", name) for name in left]
    assert all(kinds) and sorted(m.group(2) for m in kinds) == ["old", "tmp"], left
    dead = kinds[0].group(1)
    (path / "engines" / f".x.plan.{dead}-0123abcd").write_bytes(b"older code's temporary file")
    running = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (path / f".manifest.json.{running.pid}-89abcdef.tmp").write_bytes(b"a writer's, still running")
        bundle = load_bundle(path)
        assert bundle.thresholds().version == 1
        bundle.replace_file("engines/x.plan", b"plan 2")
        assert hidden(path) == [f".manifest.json.{running.pid}-89abcdef.tmp"]
        assert hidden(path / "engines") == []
    finally:
        running.stdin.close()
        running.wait(timeout=30)


def test_a_daemon_refuses_thresholds_for_a_bundle_switched_under_it_until_it_reloads(tmp_path):
    """A real daemon on bundles/current; teach's link switch to a new model before the reload; set_thresholds is
    refused in the reply and both bundles still load; after the reload it is written into the new one."""
    from daemon_harness import Station
    from station_model import M, grey_graph, write_grey_bundle

    write_grey_bundle(tmp_path / "m")
    write_bundle(  # another model: its scorer differs, so does its model_id
        tmp_path / "m-v2",
        {"method": "test", "backbone": "none", "input": {"height": M, "width": M, "channels": 1, "resize": "stretch"}}
        | {"scorer_inputs": ["centre"], "score_kind": "max"},
        grey_graph(),
        {"centre": np.array([120.0], np.float32)},
        {},
        T.first_version(0.5, 0.5, {}),
    )
    link = tmp_path / "current"
    link.symlink_to("m")
    camera = {"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}
    station = Station(tmp_path, link, [camera])
    document = T.next_version(load_bundle(link).thresholds(), image_threshold=0.6).to_dict()
    try:
        station.wait_ready()
        switch_link(link, tmp_path / "m-v2")
        refused = station.control({"cmd": "set_thresholds", "thresholds": document})
        assert refused["ok"] is False and "current: changed on disk since it was loaded" in refused["error"], refused
        for name in ("m", "m-v2"):
            assert load_bundle(tmp_path / name).thresholds().version == 1
        assert station.control({"cmd": "reload"})["ok"]
        assert station.control({"cmd": "set_thresholds", "thresholds": document})["ok"]
        assert load_bundle(tmp_path / "m-v2").thresholds().image_threshold == 0.6
    finally:
        assert station.stop() == 0, station.log_tail()


def test_teach_never_stages_its_version_over_a_directory_left_by_an_earlier_teach(tmp_path):
    """A teach killed between its two renames leaves the version that was in service under its staging name
    (.NAME.teach-PID), and a later process may get the same PID: that directory is left alone, never emptied."""
    from calibration.teach import bundle_version, write_version

    bundle = load_bundle(make(tmp_path / "b"))
    left = tmp_path / f".b.teach-{os.getpid()}"
    make(left, seed=1)
    kept = load_bundle(left).model_id
    params = {k: v + 1 for k, v in bundle.scorer_params().items()}
    version = bundle_version(bundle) + 1
    record = {"version": version, "previous_version": bundle_version(bundle)}
    write_version(bundle, params, T.next_version(bundle.thresholds(), image_threshold=0.9), version, record)
    assert load_bundle(left).model_id == kept
    assert bundle_version(load_bundle(tmp_path / "b")) == version
    assert load_bundle(tmp_path / "b.versions" / "v1").model_id == bundle.model_id


CALIBRATE_ROLLBACK = """
import sys
from inspectd.cli import main
sys.exit(main(["calibrate", sys.argv[1], "--rollback", "1"]))
"""


def test_calibrate_whose_last_sync_fails_says_the_version_is_written_and_exits_as_written(tmp_path):
    """EIO from the sync after the manifest's last rename (the last fsync calibrate makes): the version is what the
    next load reads, so calibrate says so in a WARNING and reports it written (exit 0), not "not written"."""
    path = make(tmp_path / "b")
    assert child(REWRITE, path).returncode == 0  # version 2, so that there is a version 1 to go back to
    fsyncs = renames_made(CALIBRATE_ROLLBACK, path, tmp_path / "counted", calls="fsync")["fsync"]
    failed = child(CALIBRATE_ROLLBACK, path, "-f", "-e", f"inject=fsync:error=EIO:when={fsyncs}")
    assert failed.returncode == 0, failed.stderr
    assert "WARNING: version 3: " in failed.stderr and "written, but it may not be on disk yet" in failed.stderr
    assert "wrote thresholds version 3 (was 2)" in failed.stdout, failed.stdout
    assert load_bundle(path).thresholds().version == 3


def test_a_bundle_directory_gone_while_a_writer_waits_for_its_lock_is_a_one_line_refusal(tmp_path):
    """A writer waits for the lock while the directory is moved away under it (a hand's `mv`, a swap's undo that
    failed) and nothing is put back at the name: a one-line BundleError naming it, not a raw FileNotFoundError."""
    import threading

    from engines.bundle.store import swapping

    path = make(tmp_path / "b")
    daemon = load_bundle(path)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            daemon.replace_file(T.FILE_NAME, next_thresholds(daemon, 0.9))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what comes out is the point
            outcome.append(exc)

    def waiting() -> bool:  # the writer holds its own descriptor of the directory: it waits for the lock
        opened = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                opened.append(os.readlink(f"/proc/self/fd/{fd}"))
        return opened.count(str(path.resolve())) >= 2

    with swapping(path):
        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 10
        while not waiting():
            assert time.monotonic() < deadline, "the writer never waited for the lock"
            time.sleep(0.01)
        os.rename(path, tmp_path / "moved")
    writer.join(60)
    (error,) = outcome
    assert isinstance(error, BundleError), repr(error)
    assert str(error).startswith(f"{path.resolve()}: gone while this writer waited for its lock") and "\n" not in str(
        error
    )


# --- a teach whose bundle changed while it fitted -------------------------------------------------------------------

HELD_TEACH = """
import sys, time
from pathlib import Path
from calibration.teach import bundle_version, linked_dir, write_version
from engines.bundle import thresholds as T
from engines.bundle.store import load_bundle
b = load_bundle(sys.argv[1])
target = linked_dir(Path(sys.argv[1]))  # as teach records it, for --rollback
Path(sys.argv[2] + ".loaded").touch()
deadline = time.monotonic() + 60
while not Path(sys.argv[2] + ".go").exists():  # teach fits for minutes between its load and its switch
    assert time.monotonic() < deadline, "never told to go"
    time.sleep(0.02)
params = {k: v + float(sys.argv[3]) for k, v in b.scorer_params().items()}
version = bundle_version(b) + 1
record = {"version": version, "previous_version": bundle_version(b), "previous_model_id": b.model_id}
if target is not None:
    record["previous_dir"] = target.name
write_version(b, params, T.next_version(b.thresholds(), image_threshold=0.9), version, record)
print(load_bundle(sys.argv[1]).model_id)
"""


def held_teach(bundle: Path, name: Path, offset: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HELD_TEACH, str(bundle), str(name), str(offset)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("linked", [False, True], ids=["in-place", "linked"])
def test_of_two_overlapping_teaches_the_second_switches_nothing_and_the_first_stays_rollbackable(tmp_path, linked):
    """Two teaches of one bundle in two processes: B loads, A loads and switches its version in, then B gets to its
    switch. B once swapped its version in over A's without a word (moving A's aside as "the version taught from",
    so --rollback refused; linked, the link left A's directory orphaned): now B is refused and removes its staging
    copy, and A's version and its rollback are intact."""
    from calibration.teach import rollback

    original = make(tmp_path / "m")
    first = load_bundle(original).model_id
    bundle = tmp_path / "current" if linked else original
    if linked:
        bundle.symlink_to("m")
    b = held_teach(bundle, tmp_path / "B", 2)
    wait_for(tmp_path / "B.loaded", b)
    (tmp_path / "A.go").touch()
    a = held_teach(bundle, tmp_path / "A", 1)
    a_out, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err
    taught_by_a = a_out.strip()
    (tmp_path / "B.go").touch()
    _, b_err = b.communicate(timeout=120)
    assert b.returncode != 0
    last = b_err.strip().splitlines()[-1]
    # Linked, B finds the link on A's directory: the bundle it reads there is not the one it loaded.
    where = tmp_path / "m-v2" if linked else bundle
    assert (
        f"ChangedOnDisk: {where}: changed on disk since it was loaded (now model {taught_by_a!r} bundle_version 2, "
        f"loaded {first!r} bundle_version 1), expected the bundle loaded: nothing switched; teach again"
    ) in last, b_err
    assert load_bundle(bundle).model_id == taught_by_a
    assert not list(tmp_path.glob(".*teach-*"))  # B's staging copy
    if linked:
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink()) == ["m", "m-v2"]
    else:
        assert sorted(p.name for p in (tmp_path / "m.versions").iterdir()) == ["v1"]
    assert rollback(bundle, out=io.StringIO()).model_id == first


def test_a_teach_refuses_to_switch_in_over_thresholds_written_since_it_loaded(tmp_path):
    """A real `inspectd calibrate` writes thresholds version 2 after a teach loaded version 1 and before it switches:
    the teach's document, also version 2, would have replaced it in BUNDLE (one number, two documents). Now the teach
    is refused, names the rewritten file, and BUNDLE keeps the calibrated version."""
    import cv2

    from calibration.teach import bundle_version, write_version
    from station_model import good_frame, write_grey_bundle

    path = write_grey_bundle(tmp_path / "b")
    bundle = load_bundle(path)  # teach's load, before minutes of fitting
    good = tmp_path / "good"
    good.mkdir()
    for i in range(20):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    calibrated = subprocess.run(
        [sys.executable, "-m", "inspectd", "calibrate", str(path), "--good", str(good)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert calibrated.returncode == 0, calibrated.stderr
    document = (path / T.FILE_NAME).read_bytes()
    params = {k: v + 1 for k, v in bundle.scorer_params().items()}
    record = {"version": 2, "previous_version": 1, "previous_model_id": bundle.model_id}
    with pytest.raises(store.ChangedOnDisk) as refused:
        write_version(bundle, params, T.next_version(bundle.thresholds(), image_threshold=0.61), 2, record)
    assert str(refused.value) == (
        f"{path}: changed on disk since it was loaded (now model {bundle.model_id!r} bundle_version 1 with "
        f"{T.FILE_NAME} rewritten, loaded {bundle.model_id!r} bundle_version 1), expected the bundle loaded: nothing "
        "switched; teach again"
    )
    assert (path / T.FILE_NAME).read_bytes() == document and bundle_version(load_bundle(path)) == 1
    assert not list((tmp_path / "b.versions").glob("*")) and hidden(tmp_path) == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def aged(path: Path) -> Path:
    """Staged copy `path` as one left there for longer than the clean-up's margin."""
    from calibration.teach import STAGING_MARGIN_S

    old = time.time() - 2 * STAGING_MARGIN_S
    os.utime(path, (old, old))
    return path


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "note:" in line]


def test_a_teach_removes_staged_copies_of_killed_teaches_but_a_live_ones_and_keeps_a_version_that_was_in_service(
    tmp_path,
):
    """A teach killed after staging left `.NAME.teach-PID` (a whole bundle) that nothing removed. The next teach
    removes those of processes that are gone, keeps a live process's, and moves the one a teach cut off between its
    two renames left the version taught from in to BUNDLE.versions, where `teach --rollback` takes it back from (a
    second copy of it, whose name there is taken, stays with a note)."""
    from calibration.teach import rollback

    path = make(tmp_path / "b")
    first = load_bundle(path).model_id
    assert child(TEACH_RECORDED, path).returncode == 0
    dead = dead_pid()
    # Cut off between its renames: the version taught from under the staging name, not in b.versions.
    cut_off = tmp_path / f".b.teach-{dead}"
    shutil.copytree(tmp_path / "b.versions" / "v1", tmp_path / f".b.teach-{dead}-3")
    (tmp_path / "b.versions" / "v1").rename(cut_off)
    second = aged(tmp_path / f".b.teach-{dead}-3")
    aged(cut_off)
    killed = [
        aged(make(tmp_path / f".b.teach-{dead}-2", seed=5)),
        aged(make(tmp_path / f".b.teach-{dead_pid()}", seed=6)),
    ]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = aged(make(tmp_path / f".b.teach-{live.pid}", seed=7))
        taught = child(TEACH_RECORDED, path)
        assert taught.returncode == 0, taught.stderr
        assert not any(p.exists() for p in killed)
        assert load_bundle(running).model_id
    finally:
        live.kill()
        live.wait()
    v1 = tmp_path / "b.versions" / "v1"
    assert not cut_off.exists() and load_bundle(v1).model_id == load_bundle(second).model_id == first
    assert notes(taught.stderr) == [
        f"inspectd teach: note: moved {cut_off} to {v1}: it holds version 1 ({first}), which was in service (a teach "
        "killed between its two renames left it there)",
        f"inspectd teach: note: kept {second}: it holds version 1 ({first}), which was in service, and {v1} is taken: "
        f"move it to a free name in {tmp_path / 'b.versions'} to keep it, or remove it",
        f"inspectd teach: note: removed 2 staged version(s) left by teaches that were killed: {killed[0]}, {killed[1]}",
    ], taught.stderr
    rollback(path, out=io.StringIO())
    assert rollback(path, out=io.StringIO()).model_id == first


def test_a_version_a_killed_teach_left_staged_is_never_removed_however_many_teaches_follow(tmp_path):
    """A teach killed right after its exchange leaves the version taught from (its only copy) under its staging
    name. The next teach kept it, as the version its bundle was taught from; the teach after that removed it, and
    --rollback could no longer get back to it. Now a later teach moves it into BUNDLE.versions, and rolling back
    reaches it after two more teaches."""
    from calibration.teach import rollback

    path = make(tmp_path / "b")
    first = load_bundle(path).model_id
    # Which call, and which of its calls, comes right after the exchange: the rename of the old version to
    # b.versions, where teach is killed.
    copy(path, tmp_path / "counted")
    trace = tmp_path / "counted.trace"
    counted = subprocess.run(
        [strace(), "-f", "-o", str(trace), "-e", f"trace={RENAMES}", sys.executable, "-c", TEACH_RECORDED]
        + [str(tmp_path / "counted")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert counted.returncode == 0, counted.stderr
    calls = [m for line in trace.read_text().splitlines() if (m := re.match(r"^\d+\s+(\w+)\(", line))]
    exchanges = [i for i, m in enumerate(calls) if "RENAME_EXCHANGE" in m.string]
    if not exchanges:
        pytest.skip("this kernel or file system cannot swap two directories in one step")
    after = calls[exchanges[0] + 1].group(1)
    nth = [m.group(1) for m in calls[: exchanges[0] + 2]].count(after)
    killed = child(TEACH_RECORDED, path, "-f", "-e", f"inject={after}:signal=SIGKILL:when={nth}")
    assert killed.returncode != 0, killed.stderr
    (staged,) = tmp_path.glob(".b.teach-*")
    assert load_bundle(staged).model_id == first and not list((tmp_path / "b.versions").glob("*"))

    aged(staged)
    for _ in range(2):
        taught = child(TEACH_RECORDED, path)
        assert taught.returncode == 0, taught.stderr
    assert not list(tmp_path.glob(".b.teach-*"))
    assert load_bundle(tmp_path / "b.versions" / "v1").model_id == first
    versions = [bundle_version(rollback(path, out=io.StringIO())) for _ in range(3)]
    assert versions == [3, 2, 1] and load_bundle(path).model_id == first


LOCKED = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_staged_copy_of_a_teach_in_another_pid_namespace_is_left_alone(tmp_path):
    """A teach in a container sees no process with another namespace's teach's PID, and once removed that teach's
    staged copy while it was still being written or swapped. Now a copy is removed only once it has not changed for
    STAGING_MARGIN_S and no process holds its lock (a swap holds it on the version its exchange put there)."""
    path = make(tmp_path / "b")
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("no PID namespace for this user (unshare --pid)")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder = None
    try:
        writing = make(tmp_path / f".b.teach-{live.pid}", seed=1)  # another namespace's teach, writing its copy
        swapping = aged(make(tmp_path / f".b.teach-{dead_pid()}", seed=2))  # ... and one swapping its copy
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCKED, str(swapping)], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        in_container = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", TEACH_RECORDED, str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert in_container.returncode == 0, in_container.stderr
        assert notes(in_container.stderr) == [] and load_bundle(writing).model_id and load_bundle(swapping).model_id
    finally:
        for process in (live, holder):
            if process is not None:
                process.kill()
                process.wait()
    # Its teach gone and its lock released, the copy long unchanged is removed.
    taught = child(TEACH_RECORDED, path)
    assert taught.returncode == 0, taught.stderr
    assert not swapping.exists() and notes(taught.stderr) == [
        f"inspectd teach: note: removed 1 staged version(s) left by teaches that were killed: {swapping}"
    ]


def test_a_killed_re_teach_on_the_same_frames_is_removed_not_kept_as_the_version_it_was_taught_from(tmp_path):
    """Teaching again on the same frames gives the same parameters, so the same model id: a re-teach killed before
    its swap left a staged copy of the current model under a newer version number, which never went into service.
    Matched on the model id alone it passed for a version that was in service and moved into BUNDLE.versions for
    good; matched on model and version it is removed."""
    path = make(tmp_path / "b")
    assert child(TEACH_RECORDED, path).returncode == 0
    current = load_bundle(path)
    staged = tmp_path / f".b.teach-{dead_pid()}"
    shutil.copytree(path, staged)
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["bundle_version"] = current.manifest["bundle_version"] + 1
    (staged / "manifest.json").write_text(json.dumps(manifest))
    aged(staged)
    taught = child(TEACH_RECORDED, path)
    assert taught.returncode == 0, taught.stderr
    assert not staged.exists()
    assert notes(taught.stderr) == [
        f"inspectd teach: note: removed 1 staged version(s) left by teaches that were killed: {staged}"
    ], taught.stderr
    assert sorted(p.name for p in (tmp_path / "b.versions").iterdir()) == ["v1", "v2"]
