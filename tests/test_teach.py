"""`inspectd teach`: the scorer refitted on the station (ONNX Runtime features, numpy fit) matches `inspectd train`'s
fit of the same recipe on the same frames, for every scorer; the new version keeps the graph and carries provenance,
recalibrated thresholds and the comparison; rollback puts the previous version back; a bundle without the feature
graph gets one line; teaching straight from a real daemon's image archive fits what teaching on its export fits."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.bundle.format import FEATURE_GRAPH, GRAPH, MANIFEST, WEIGHTS
from engines.bundle.store import load_bundle
from engines.data.synthline import SyntheticLine
from ports import free_port
from station_model import TEACH_RECORDED
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
SIZE = 64
HOLDOUT = 0.25
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    SyntheticLine(96, 96, seed=3).write_folder(folder, 16)
    return folder


@pytest.fixture(scope="module", params=["memory", "gaussian", "kmeans"])
def trained(request, good, tmp_path_factory) -> Path:
    from engines.training.train import Progress, train_bundle

    out = tmp_path_factory.mktemp("bundles") / request.param
    # memory_size below the patch count (12 frames x 4x4 locations), so the coreset selection itself is compared.
    train_bundle(
        good,
        out,
        size=(SIZE, SIZE),
        scorer=request.param,
        k=2,
        memory_size=40,
        seed=5,
        holdout=HOLDOUT,
        progress=Progress(enabled=False),
    )
    return out


def args(bundle: Path, **kw) -> argparse.Namespace:
    base = dict(
        bundle=str(bundle),
        good=None,
        archive=None,
        since=None,
        until=None,
        camera=None,
        any_model=False,
        rollback=False,
        holdout=HOLDOUT,
        by="tester",
        target_false_reject=None,
        pixel_fpr=None,
        apply=None,
        timeout=5.0,
        server_key=None,
        client_key=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_teach_matches_train_and_rolls_back(trained, good, tmp_path):
    from calibration.teach import teach, versions_dir

    before = load_bundle(trained)
    trained_params = before.scorer_params()
    before_version = before.thresholds().version
    out = io.StringIO()
    taught = teach(trained, good, holdout=HOLDOUT, by="tester", out=out)

    # Same recipe, same frames, same seed: the same parameters to float tolerance (ONNX Runtime's features differ
    # from torch's by ~1e-6 relative), and the same verdicts on the held-out frames.
    params = taught.scorer_params()
    assert params.keys() == trained_params.keys()
    for name, value in params.items():
        assert value.shape == trained_params[name].shape, name
        np.testing.assert_allclose(value, trained_params[name], rtol=2e-3, atol=2e-4 * float(np.abs(value).max()))
    record = taught.manifest["teach"]
    comparison = record["comparison"]
    assert comparison["frames"] == 4 and record["frames"]["n_fit"] == 12 and record["by"] == "tester"
    assert comparison["current"]["score_median"] == pytest.approx(comparison["taught"]["score_median"], rel=1e-3)
    assert taught.manifest["bundle_version"] == 2 and record["previous_model_id"] == before.model_id

    # The graph and weights are carried over byte for byte: nothing was rebuilt.
    for name in (GRAPH, WEIGHTS, FEATURE_GRAPH):
        assert taught.manifest["files"][name] == before.manifest["files"][name]
    thresholds = taught.thresholds()
    assert thresholds.version == before_version + 1
    assert thresholds.provenance["good_scores"]["n"] == 4
    assert thresholds.provenance["tool"].startswith("inspectd teach")
    assert "version 2" in out.getvalue() and "held-out" in out.getvalue()

    from calibration.teach import rollback

    restored = rollback(trained, out=io.StringIO())
    assert restored.model_id == before.model_id and restored.manifest.get("bundle_version", 1) == 1
    assert (versions_dir(trained) / "v2").is_dir()


def test_teach_drops_the_old_scorers_camera_overrides_and_its_thresholds_cannot_be_rolled_back_to(
    trained, good, tmp_path
):
    """Per-camera thresholds and earlier versions were set on the old scorer's scores: teach drops the overrides
    (saying so) and a thresholds rollback to a version before it is refused, pointing at teach --rollback."""
    import shutil

    from calibration.teach import teach
    from engines.bundle import thresholds as thresholds_doc

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    before = load_bundle(bundle)
    override = thresholds_doc.next_version(
        before.thresholds(), per_camera={"cam1": {"image_threshold": 123.0}}, provenance={"tool": "test"}
    )
    before.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(override))
    out = io.StringIO()
    taught = teach(bundle, good, holdout=HOLDOUT, by="tester", out=out).thresholds()
    assert taught.per_camera == {} and taught.provenance["dropped_per_camera"] == override.per_camera
    assert "per-camera thresholds of cam1 were set on the old scorer's scores and are dropped" in out.getvalue()
    assert thresholds_doc.calibrated_range(taught, "image") == thresholds_doc.calibrated_range(taught, "image", False)

    with pytest.raises(thresholds_doc.ThresholdsError, match="inspectd teach --rollback"):
        thresholds_doc.rollback(taught, override.version)
    # Versions from the teach on roll back as before.
    later = thresholds_doc.next_version(taught, image_threshold=taught.image_threshold * 2, provenance={"tool": "x"})
    assert thresholds_doc.rollback(later, taught.version).image_threshold == taught.image_threshold


def test_a_bundle_without_the_feature_graph_gets_one_line(trained, good, tmp_path, capsys):
    from calibration import teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    old = tmp_path / "old"
    import shutil

    shutil.copytree(trained, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["files"].pop(FEATURE_GRAPH)
    (old / FEATURE_GRAPH).unlink()
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert teach.run(args(old, good=str(good))) == 2
    err = capsys.readouterr().err.strip()
    expected = f"bundle {old} has no features output ({FEATURE_GRAPH}); re-export with inspectd export {old}"
    assert err == f"inspectd teach: {expected}"
    assert teach.run(args(old)) == 2  # neither --good nor --rollback
    assert "exactly one of --good" in capsys.readouterr().err
    assert teach.run(args(old, rollback=True)) == 2  # not a taught bundle
    assert "was not taught" in capsys.readouterr().err


def test_apply_to_a_daemon_that_shuts_the_key_out_is_refused_before_any_work(pki, tmp_path, capsys):
    """A --server-key that is not the daemon's: the handshake is ended, and teach says so before it reads a frame or
    writes a version the daemon would never load (it used to teach, write, then report the daemon as silent)."""
    from calibration import teach
    from inspectd.daemon.control import ControlServer
    from inspectd.daemon.security import CurveServer

    operator_public, operator_secret = pki["allowed"]

    class Daemon:
        def status(self):
            return {"model_id": "m"}

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Daemon(), curve=guard)
    server.start()
    try:
        bundle = tmp_path / "no-bundle-read"  # nothing is read before the refusal
        wrong = args(bundle, good=str(tmp_path / "no-frames-read"), apply=endpoint, timeout=2.0)
        wrong.server_key, wrong.client_key = str(operator_public), str(operator_secret)
        assert teach.run(wrong) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"inspectd teach: control {endpoint}: the daemon ended the CurveZMQ handshake"), err
        assert "a --server-key that is not its public key" in err and len(err.splitlines()) == 1
        assert not bundle.exists()
    finally:
        server.stop()
        guard.stop()


def test_a_linked_bundle_gets_its_new_version_beside_the_target_and_the_link_switches_back_and_forth(
    trained, good, tmp_path
):
    """deploy's layout: bundles/current -> <name> (a relative link). teach writes <name>-v2 beside <name> and switches
    the link atomically, leaving <name> as it was and nothing else in bundles/; --rollback points the link back; a
    second teach finds <name>-v2 taken and picks a free name."""
    import os
    import shutil

    from calibration.teach import rollback, teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(trained, bundles / "frozen-a")
    (bundles / "current").symlink_to("frozen-a")
    before = load_bundle(bundles / "frozen-a")

    out = io.StringIO()
    taught = teach(bundles / "current", good, holdout=HOLDOUT, by="tester", out=out)
    assert os.readlink(bundles / "current") == "frozen-a-v2"  # still a relative link, now to the new directory
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "frozen-a", "frozen-a-v2"]
    assert taught.manifest["bundle_version"] == 2 and taught.manifest["teach"]["previous_dir"] == "frozen-a"
    untouched = load_bundle(bundles / "frozen-a")
    assert untouched.manifest == before.manifest and untouched.model_id == before.model_id
    assert load_bundle(bundles / "current").model_id == taught.model_id
    assert str(bundles / "frozen-a-v2") in out.getvalue()

    taught_thresholds = taught.thresholds().version  # read through the link: before it switches back
    restored = rollback(bundles / "current", out=io.StringIO())
    assert os.readlink(bundles / "current") == "frozen-a" and restored.model_id == before.model_id
    back = restored.thresholds()
    assert back.version == taught_thresholds + 1 and back.provenance["model_id"] == before.model_id
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "frozen-a", "frozen-a-v2"]

    teach(bundles / "current", good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    assert os.readlink(bundles / "current") == "frozen-a-v2-2"
    assert load_bundle(bundles / "frozen-a-v2").model_id == taught.model_id  # the first taught version stays

    absolute = tmp_path / "absolute"
    absolute.symlink_to(bundles / "frozen-a")
    teach(absolute, good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    assert os.readlink(absolute) == str(bundles / "frozen-a-v2-3")  # absolute stays absolute
    assert rollback(absolute, out=io.StringIO()).model_id == before.model_id
    assert os.readlink(absolute) == str(bundles / "frozen-a")


def in_process_daemon(tmp_path: Path, bundle: Path):
    """inspectd.daemon.service.Daemon on `bundle` with one slow synthetic camera: its set_thresholds is the control
    handler's."""
    from daemon_harness import in_process_config
    from inspectd.daemon.service import Daemon

    source = {"kind": "synthetic", "rate_hz": 5, "width": 96, "height": 96}
    daemon = Daemon(in_process_config(tmp_path, bundle, source))
    daemon.start()
    return daemon


def test_taught_thresholds_name_the_taught_model_so_a_daemon_running_the_model_taught_from_refuses_them(
    trained, good, tmp_path
):
    """A saved copy of taught thresholds set on the model they were not taught for: the daemon's fit check refuses
    it by the provenance's model_id (a document without one skips that check). The thresholds
    `teach --rollback` writes into the restored bundle name that model and are numbered above the taught ones, so
    the same daemon accepts them."""
    import shutil

    from calibration.teach import rollback, teach
    from engines.bundle import thresholds as thresholds_doc
    from inspectd.errors import InspectdError

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    shutil.copytree(trained, tmp_path / "running")
    shutil.copytree(trained, tmp_path / "b")
    original = load_bundle(tmp_path / "b")
    before = original.thresholds()  # read now: a Bundle reads its thresholds from its path, which teach replaces
    taught = teach(tmp_path / "b", good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    document = taught.thresholds()
    assert document.provenance["model_id"] == taught.model_id != original.model_id
    assert document.version > before.version  # so the daemon's version check does not refuse it first

    out = io.StringIO()
    restored = rollback(tmp_path / "b", out=out)
    back = restored.thresholds()
    assert restored.model_id == original.model_id and back.provenance["model_id"] == original.model_id
    assert back.version == document.version + 1 and f"thresholds version {back.version}" in out.getvalue()
    assert (back.image_threshold, back.pixel_threshold) == (before.image_threshold, before.pixel_threshold)
    # Its own history: the taught versions were set on another scorer's scores.
    assert [h["version"] for h in back.history] == [before.version] + [h["version"] for h in before.history]
    assert thresholds_doc.rollback(back, before.version).image_threshold == back.image_threshold

    on_disk = tmp_path / "running" / thresholds_doc.FILE_NAME
    unchanged = on_disk.read_bytes()
    daemon = in_process_daemon(tmp_path, tmp_path / "running")
    try:
        assert daemon.stage.state.model_id == original.model_id
        with pytest.raises(InspectdError) as refused:
            daemon.set_thresholds(document.to_dict())
        assert str(refused.value) == (
            f"thresholds.provenance.model_id: {taught.model_id}, expected the running model {original.model_id} "
            "(calibrated on another model's scores), or force"
        )
        assert on_disk.read_bytes() == unchanged and daemon.stage.state.thresholds_version == before.version
        assert daemon.set_thresholds(back.to_dict()) == {"thresholds_version": back.version}
    finally:
        daemon.shutdown()


def test_teach_and_rollback_in_place_keep_every_version_when_version_numbers_repeat(trained, good, tmp_path):
    """Directory layout: teach T1, rollback, teach T2 (version 2 again), rollback. Each version moved aside gets a
    free name in BUNDLE.versions (the second version 2 is v2-2), the teach record names the one it replaced, rollback
    takes it from there, and both taught models still load.
    The thresholds versions the daemon sees only go up."""
    import shutil

    from calibration.teach import rollback, teach, versions_dir

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    fewer = tmp_path / "fewer"  # other frames, so another model
    fewer.mkdir()
    for path in sorted(good.glob("*.png"))[:12]:
        shutil.copy(path, fewer / path.name)
    original = load_bundle(bundle)
    thresholds_versions = [original.thresholds().version]

    first = teach(bundle, good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    thresholds_versions.append(first.thresholds().version)
    assert first.manifest["teach"]["previous_in_versions"] == "v1"
    thresholds_versions.append(rollback(bundle, out=io.StringIO()).thresholds().version)
    out = io.StringIO()
    second = teach(bundle, fewer, holdout=HOLDOUT, by="tester", out=out)
    thresholds_versions.append(second.thresholds().version)
    assert second.manifest["bundle_version"] == first.manifest["bundle_version"] == 2
    assert second.model_id != first.model_id
    assert second.manifest["teach"]["previous_in_versions"] == "v1"
    assert f"previous version in {versions_dir(bundle) / 'v1'}" in out.getvalue()

    out = io.StringIO()
    restored = rollback(bundle, out=out)
    thresholds_versions.append(restored.thresholds().version)
    assert restored.model_id == original.model_id
    assert f"version 2 ({second.model_id}) kept in {versions_dir(bundle) / 'v2-2'}" in out.getvalue()
    kept = {p.name: load_bundle(p).model_id for p in versions_dir(bundle).iterdir()}
    assert kept == {"v2": first.model_id, "v2-2": second.model_id}
    assert thresholds_versions == sorted(set(thresholds_versions)), thresholds_versions


def test_a_bundle_cut_off_between_two_renames_is_found_where_it_was_moved_last_not_at_the_highest_number(
    trained, good, tmp_path
):
    """teach T1 in place, rollback (T1 kept as v2, v1 free again), then a teach of the restored model cut off after
    the first of its two renames (a file system without an exchange): the bundle in service sits at v1, the name
    that teach took, and loading BUNDLE says to move v1 back, naming v2 (the model rolled back from) only as what the
    highest number would say where the times were changed."""
    import shutil
    import time

    from calibration.teach import free_version_dir, rollback, teach, versions_dir
    from engines.errors import BundleError

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    original = load_bundle(bundle).model_id
    first = teach(bundle, good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    rollback(bundle, out=io.StringIO())
    # A teach minutes later: its rename's change time is after the rollback's, on a file system of any granularity.
    probe, moved = tmp_path / "probe", versions_dir(bundle) / "v2"
    deadline = time.monotonic() + 5
    while probe.touch() or probe.stat().st_ctime_ns <= moved.stat().st_ctime_ns:
        assert time.monotonic() < deadline, "the file system's clock does not move"
        time.sleep(0.01)
    keep = free_version_dir(versions_dir(bundle), 1)
    assert keep.name == "v1"
    os.replace(bundle, keep)  # replace_dir's first rename; its second never came
    assert load_bundle(versions_dir(bundle) / "v2").model_id == first.model_id
    with pytest.raises(BundleError) as refused:
        load_bundle(bundle)
    assert str(refused.value) == (
        f"{bundle}: missing; a bundle write was cut off and left the previous bundle at {keep}, expected it back in "
        f"place (mv {keep} {bundle}); if the versions' times were changed since (copied, clock set back), it is "
        f"{versions_dir(bundle) / 'v2'}"
    )
    assert load_bundle(keep).model_id == original


def test_rollback_to_a_taught_version_keeps_its_thresholds_rollback_to_the_versions_of_its_own_scorer(
    trained, good, tmp_path
):
    """teach T1, teach T2 on it, rollback: T1 is back with its own thresholds as a new version. A thresholds rollback
    (ctl rollback) to T1's taught version, set on T1's scorer, is allowed; T2's versions, set on T2's scorer, are not
    in its history at all."""
    import shutil

    from calibration.teach import rollback, teach
    from engines.bundle import thresholds as thresholds_doc

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for path in sorted(good.glob("*.png"))[:12]:
        shutil.copy(path, fewer / path.name)
    first = teach(bundle, good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    own = first.thresholds()
    later = teach(bundle, fewer, holdout=HOLDOUT, by="tester", out=io.StringIO()).thresholds()
    back = rollback(bundle, out=io.StringIO()).thresholds()
    assert back.version == later.version + 1 and back.provenance["model_id"] == first.model_id
    assert back.provenance["restored"]["version"] == own.version
    assert back.provenance["tool"].startswith("inspectd teach --rollback ")  # said like every other version
    assert later.version not in [h["version"] for h in back.history]
    assert thresholds_doc.rollback(back, own.version).image_threshold == own.image_threshold
    with pytest.raises(thresholds_doc.ThresholdsError, match="inspectd teach --rollback"):
        thresholds_doc.rollback(back, own.history[0]["version"])  # the version before T1's teach: another scorer


def inspectd(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", *argv], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_teach_from_the_daemons_archive_equals_teach_on_its_export(trained, tmp_path):
    """A real daemon archives one good frame in two (and every defect) of two synthetic cameras; `inspectd teach
    --archive DIR --since 1h --camera cam0` takes exactly cam0's frames judged ok, records them, and fits what `inspectd
    teach --good` fits on the same frames exported with `inspectd archive export`. Too few frames: one line, nothing
    written."""
    import datetime
    import shutil
    import time

    from daemon_harness import Station
    from engines.bundle import thresholds as thresholds_doc
    from inspectd.protocol.archive import ArchiveReader
    from inspectd.protocol.messages import Result

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    count = 40
    cameras = [
        {
            "id": cam,
            "source": {
                "kind": "synthetic",
                "width": 96,
                "height": 96,
                "seed": seed,
                "defect_rate": 0.3,
                "rate_hz": 100.0,
                "count": count,
            },
            "queue": {"policy": "block"},
        }
        for cam, seed in (("cam0", 11), ("cam1", 12))
    ]
    # The running copy's threshold between this line's good frames (scores up to ~28 against a bundle fitted on 12
    # frames of another seed) and its defects (from ~41), so the daemon judges most good frames ok.
    shutil.copytree(trained, tmp_path / "running")
    running = load_bundle(tmp_path / "running")
    loose = thresholds_doc.next_version(running.thresholds(), image_threshold=35.0, provenance={"tool": "test"})
    running.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(loose))
    # A queue for every frame of the run: the writer falling behind on a loaded machine (it fsyncs) leaves a frame
    # unarchived, and this test is about the frames that were.
    station = Station(tmp_path, tmp_path / "running", cameras, archive={"good_every": 2, "queue": 2 * count})
    results: list[Result] = []
    try:
        station.wait_ready()
        last = {"cam0": -1, "cam1": -1}
        # 40 frames at 100 Hz are over in 0.4 s: on a loaded machine, before the status the subscription waits for.
        for message in station.early:
            results.append(message)
            last[message.camera] = max(last[message.camera], message.seq)
        deadline = time.monotonic() + 60
        while min(last.values()) < count - 1 and time.monotonic() < deadline:
            message = station.sub.recv(0.5)
            if isinstance(message, Result):
                results.append(message)
                last[message.camera] = max(last[message.camera], message.seq)
        assert min(last.values()) == count - 1, station.log_tail()
    finally:
        assert station.stop() == 0, station.log_tail()  # the archive's writer drains before the daemon exits
    archive = tmp_path / "state" / "archive"
    archived = {r.archive_id: r for r in results if r.archive_id}
    assert any(r.verdict == "defect" and r.camera == "cam0" for r in archived.values()), "no defect to leave out"

    from_archive, from_export = tmp_path / "from-archive", tmp_path / "from-export"
    shutil.copytree(trained, from_archive)
    shutil.copytree(trained, from_export)
    common = ("--holdout", str(HOLDOUT), "--by", "tester")
    taught = inspectd(
        "teach", str(from_archive), "--archive", str(archive), "--since", "1h", "--camera", "cam0", *common
    )
    assert taught.returncode == 0, taught.stdout + taught.stderr
    exported = inspectd(
        "archive", "export", str(tmp_path / "export"), "--archive", str(archive), "--since", "1h",
        "--camera", "cam0", "--verdict", "ok", "--split", "train",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    good = inspectd("teach", str(from_export), "--good", str(tmp_path / "export" / "train" / "good"), *common)
    assert good.returncode == 0, good.stdout + good.stderr

    a, b = load_bundle(from_archive), load_bundle(from_export)
    frames = a.manifest["teach"]["frames"]
    ids = frames["ids"]
    # Exactly cam0's frames the daemon judged ok and archived: every one published with that verdict is there, no
    # defect verdict and no other camera's frame is.
    assert ids == sorted(ids) and len(ids) == frames["n"] >= 8
    assert {i for i, r in archived.items() if r.camera == "cam0" and r.verdict == "ok"} <= set(ids)
    assert all(archived[i].camera == "cam0" and archived[i].verdict == "ok" for i in ids if i in archived)
    assert all(i.startswith("cam0-") for i in ids)
    assert frames["archive"] == str(archive.resolve()) and frames["camera"] == "cam0" and frames["verdict"] == "ok"
    since = datetime.datetime.fromisoformat(frames["since"]).timestamp()
    assert abs(since - (time.time() - 3600)) < 60 and frames["until"] is None
    assert sorted(p.stem for p in (tmp_path / "export" / "train" / "good").glob("*.png")) == ids
    assert a.thresholds().provenance["archive"] == str(archive.resolve())
    assert "good_dir" not in a.thresholds().provenance
    assert f"{len(ids)} good frame(s) of cam0" in taught.stdout

    # The same frames in the same order, so the same fit, thresholds and drift references.
    other = b.manifest["teach"]["frames"]
    assert (frames["names_sha256"], frames["pixels_sha256"]) == (other["names_sha256"], other["pixels_sha256"])
    assert (frames["n_fit"], frames["n_holdout"]) == (other["n_fit"], other["n_holdout"])
    pa, pb = a.scorer_params(), b.scorer_params()
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-5, atol=1e-6 * float(np.abs(pb[name]).max()))
    ta, tb = a.thresholds(), b.thresholds()
    assert ta.image_threshold == pytest.approx(tb.image_threshold, rel=1e-5)
    for reference in ("good_scores", "good_brightness"):
        got, expected = ta.provenance[reference], tb.provenance[reference]
        assert got["n"] == expected["n"] and got["quantiles"] == pytest.approx(expected["quantiles"], rel=1e-5)

    # Too few: one line saying how many were found and how many are needed; the bundle stays as it was.
    before = load_bundle(from_archive).model_id
    with ArchiveReader(archive) as reader:
        first = reader.query(camera="cam0", verdict="ok")[0].t_capture

    def iso(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()

    for selection, found in (
        (("--since", "1h", "--camera", "cam9"), 0),
        (("--since", iso(first - 0.0005), "--until", iso(first + 0.0005), "--camera", "cam0"), 1),
    ):
        refused = inspectd("teach", str(from_archive), "--archive", str(archive), *selection)
        assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and line.startswith(f"inspectd teach: --archive {archive}"), line
        assert f": {found} good frame(s), expected at least 2 (some fit, some are held out)" in line, line
    no_span = inspectd("teach", str(from_archive), "--archive", str(archive))
    assert no_span.returncode == 2 and "--archive: expected --since TIME" in no_span.stderr
    assert load_bundle(from_archive).model_id == before

    # A frame whose file a power cut left empty is named and left out, as export leaves it out, not fitted.
    with ArchiveReader(archive) as reader:
        emptied = reader.file(reader.get(ids[-1]))
    emptied.write_bytes(b"")
    again = tmp_path / "again"
    shutil.copytree(trained, again)
    retaught = inspectd("teach", str(again), "--archive", str(archive), "--since", "1h", "--camera", "cam0", *common)
    assert retaught.returncode == 0, retaught.stdout + retaught.stderr
    skipped = f"skipped 1 frame(s) whose file is empty, not a whole PNG or a link loop: {ids[-1]}"
    assert f"WARNING: --archive {archive} --camera cam0 --since 1h: {skipped}" in retaught.stderr, retaught.stderr
    record = load_bundle(again).manifest["teach"]["frames"]
    assert record["ids"] == ids[:-1] and record["unreadable"] == [ids[-1]]


def refusal(capsys) -> str:
    """The one stderr line of a teach refused before any work (nothing on stdout)."""
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert captured.out == "" and "\n" not in line, captured
    return line


def memory_copy(trained: Path, good: Path, tmp_path: Path) -> tuple[Path, str, list[np.ndarray]]:
    """For the archive tests (with the memory scorer only: once is enough): a copy of the trained bundle to teach,
    its model id, and the good frames decoded, in name order."""
    import shutil

    import cv2

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    return (
        bundle,
        load_bundle(bundle).model_id,
        [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(good.glob("*.png"))],
    )


def archive_of(
    root: Path,
    frames: list[tuple[np.ndarray, str]],
    defects: tuple[int, ...] = (),
    ago: float = 300.0,
    cameras: tuple[str, ...] = ("cam0",),
    scores: dict[int, float] | None = None,
    thresholds: dict[int, float] | None = None,
) -> list[str]:
    """An image archive written by the daemon's own writer: each (image, model_id) a frame judged ok by that model
    (defect: those at `defects`), of `cameras` in turn, captured a second apart from `ago` seconds back, scored 1.0
    (else as `scores` says by index) against threshold 35.0 (else as `thresholds` says); their archive ids, in
    order."""
    import time

    from inspectd.daemon.archive import Archive
    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import Judged

    archive = Archive(root, max_mb=100, max_age_h=24, good_every=1, queue_size=len(frames) + 1).start()
    start = time.time() - ago
    ids = []
    for seq, (image, model_id) in enumerate(frames):
        frame = Frame(cameras[seq % len(cameras)], seq, f"{seq:06d}.png", start + seq, image)
        verdict = "defect" if seq in defects else "ok"
        score, threshold = (scores or {}).get(seq, 1.0), (thresholds or {}).get(seq, 35.0)
        entry_id = archive.offer(Judged(frame, verdict, score, threshold, model_id, 1, [], None))
        assert entry_id is not None
        ids.append(entry_id)
    assert archive.close(timeout=30.0)
    return ids


def test_archive_teach_takes_only_the_frames_of_this_bundles_model_and_those_it_was_taught_from(
    trained, good, tmp_path, capsys
):
    """After a changeover the span holds another product's frames, judged ok by its own model: teach --archive leaves
    them out (says how many, records them) and takes the frames of the bundle's model and of the models it was taught
    from; --any-model takes them all; a span with none of this lineage's frames is refused in one line naming the
    models, and nothing is written."""
    import shutil

    import cv2

    from calibration import teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    original = load_bundle(bundle).model_id
    first = teach.teach(bundle, good, holdout=HOLDOUT, by="tester", out=io.StringIO())

    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(good.glob("*.png"))]
    owners = ["m-a"] * 4 + [original] * 6 + [first.model_id] * 6  # the other product's, then this lineage's
    ids = archive_of(tmp_path / "archive", list(zip(images, owners, strict=True)))
    ours = [i for i, owner in zip(ids, owners, strict=True) if owner != "m-a"]

    assert teach.run(args(bundle, archive=str(tmp_path / "archive"), since="1h")) == 0
    out = capsys.readouterr().out
    taught = load_bundle(bundle)
    record = taught.manifest["teach"]
    assert record["frames"]["ids"] == ours and record["frames"]["other_models"] == {"m-a": 4}
    assert record["frames"]["model_ids"] == [first.model_id, original]
    # The chain, so the next teach needs no old version to know it.
    assert first.manifest["teach"]["ancestor_model_ids"] == [original]
    assert record["ancestor_model_ids"] == [first.model_id, original]
    assert "frames: left out 4 good frame(s) judged by other models (4 of model m-a): --any-model takes them" in out

    assert teach.run(args(bundle, archive=str(tmp_path / "archive"), since="1h", any_model=True)) == 0
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    # Nothing looked up, so nothing counted: null, not "none of another model".
    assert frames["ids"] == ids and frames["other_models"] is None and frames["model_ids"] is None
    assert "left out" not in capsys.readouterr().out

    others = archive_of(tmp_path / "others", [(image, "m-a" if i % 3 else "m-c") for i, image in enumerate(images)])
    assert len(others) == 16
    before = load_bundle(bundle)
    assert teach.run(args(bundle, archive=str(tmp_path / "others"), since="1h")) == 2
    line = refusal(capsys)
    assert line.startswith(f"inspectd teach: --archive {tmp_path / 'others'} --since 1h: 0 good frame(s) of model "
                           f"{before.model_id} or the models it was taught from ("), line  # fmt: skip
    assert "(10 of model m-a, 6 of model m-c left out)" in line and "--any-model" in line, line
    after = load_bundle(bundle)
    assert after.manifest == before.manifest and not (tmp_path / "b.versions" / "v4").exists()


class Daemon:
    """The control handler's status and reload contract over a bundle path, as the daemon's model.bundle: status
    names the model it runs, reload loads that path again."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.model_id = load_bundle(bundle).model_id

    def status(self):
        return {"model_id": self.model_id, "thresholds_version": 1, "cameras": {"cam0": {}}}

    def reload(self):
        self.model_id = load_bundle(self.bundle).model_id
        return {"model_id": self.model_id, "thresholds_version": 1, "allow_lists": {}}


def test_apply_checks_the_daemon_runs_the_bundle_before_and_the_taught_model_after(trained, good, tmp_path, capsys):
    """A daemon running another model is refused before any work (its reload would load its own bundle again); one
    whose model.bundle is another path with the same model (the operator taught a copy) reloads its unchanged
    bundle, and teach says so (exit 1) instead of reporting the taught model applied; teach and rollback applied to
    the daemon running BUNDLE are exit 0."""
    import shutil

    from calibration import teach
    from inspectd.daemon.control import ControlServer

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    running, copy, other = tmp_path / "running", tmp_path / "copy", tmp_path / "other"
    shutil.copytree(trained, running)
    shutil.copytree(trained, copy)
    shutil.copytree(trained, other)
    teach.teach(other, good, holdout=HOLDOUT, by="tester", out=io.StringIO())  # another model on the same line
    endpoint = f"ipc://{tmp_path}/control.sock"

    def against(daemon: Daemon, bundle: Path, **kw) -> tuple[int, str, str]:
        server = ControlServer(endpoint, daemon)
        server.start()
        try:
            code = teach.run(args(bundle, apply=endpoint, **kw))
        finally:
            server.stop()
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    before = load_bundle(other)
    code, out, err = against(Daemon(running), other, good=str(good))
    # (stdout also holds the stub control server's log lines)
    assert code == 2 and f"{other}: version" not in out and err.count("\n") == 1, (out, err)
    assert err.strip() == (
        f"inspectd teach: --apply {endpoint}: the daemon runs model {load_bundle(running).model_id}, {other} is "
        f"{before.model_id}, expected the bundle the daemon runs (teach its model.bundle, or --apply the daemon "
        "running this one)"
    )
    assert load_bundle(other).manifest == before.manifest

    code, out, err = against(Daemon(running), copy, good=str(good))
    taught = load_bundle(copy)
    assert taught.manifest["bundle_version"] == 2  # written where asked, as before
    assert code == 1 and "applied" not in out and err.count("\n") == 1, (out, err)
    assert err.strip() == (
        f"inspectd teach: --apply {endpoint}: reloaded, but the daemon runs {load_bundle(running).model_id}, "
        f"expected the taught model {taught.model_id}: the daemon's model.bundle is not {copy}"
    )

    daemon = Daemon(running)
    code, out, err = against(daemon, running, good=str(good))
    assert code == 0 and err == "" and f"now runs {load_bundle(running).model_id}" in out, (out, err)
    code, out, err = against(daemon, running, rollback=True)
    assert code == 0 and err == "" and daemon.model_id == load_bundle(trained).model_id, (out, err)


def test_the_too_few_frames_warning_says_how_many_to_teach_on_with_the_holdout(trained, good, tmp_path):
    """The false-reject target is met on held-out frames only: 2995 of them at 0.1 %, so with --holdout 0.25 the
    operator must teach on 11979 (the fewest whose held-out quarter rounds to 2995), not collect 2995."""
    import shutil

    from calibration import teach
    from engines.data.images import split_holdout

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    shutil.copytree(trained, tmp_path / "b")
    out = io.StringIO()
    teach.teach(tmp_path / "b", good, holdout=HOLDOUT, by="tester", out=out)
    warning = next(line for line in out.getvalue().splitlines() if "the target needs >= 2995 good frames" in line)
    assert warning.endswith(" (held out: teach on >= 11979 frames with --holdout 0.25)"), warning
    for held, holdout in ((2995, 0.25), (2995, 0.2), (299, 0.1), (8, 0.25), (8, 0.9), (1, 0.5)):
        n = teach.frames_to_hold(held, holdout)
        assert len(split_holdout(n, holdout, 0)[1]) >= held > len(split_holdout(n - 1, holdout, 0)[1]), (held, n)


def test_good_on_an_export_root_teaches_on_its_train_good(trained, good, tmp_path):
    """`inspectd archive export OUT --split train` then `teach --good OUT`, as calibrate --good takes a root: the
    frames of OUT/train/good (test/good only when there is no train/good), not "0 good frame(s)"."""
    import shutil

    from calibration.teach import folder_frames, teach
    from engines.data.images import list_images

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    root = tmp_path / "export"
    shutil.copytree(good, root / "train" / "good")
    shutil.copytree(good, root / "test" / "good", ignore=lambda d, names: sorted(names)[3:])  # not these
    for name in ("from-root", "from-folder"):
        shutil.copytree(trained, tmp_path / name)
    a = teach(tmp_path / "from-root", root, holdout=HOLDOUT, by="tester", out=io.StringIO()).manifest["teach"]
    b = teach(tmp_path / "from-folder", root / "train" / "good", holdout=HOLDOUT, by="t", out=io.StringIO())
    other = b.manifest["teach"]["frames"]
    assert a["frames"]["n"] == 16 and a["frames"]["folder"] == str((root / "train" / "good").resolve())
    assert (a["frames"]["names_sha256"], a["frames"]["pixels_sha256"]) == (
        other["names_sha256"],
        other["pixels_sha256"],
    )
    shutil.rmtree(root / "train")
    assert folder_frames(root).paths == list_images(root / "test" / "good") != []


@pytest.fixture(scope="module", params=[64, 16], ids=["one-fold", "cross-fitted"])
def auto_trained(request, tmp_path_factory) -> tuple[Path, Path]:
    """(bundle, its frames): recipe auto, train's default, on 64 frames (one validation fold: 24 held out, scored by
    the fit on the other 40; the bundle fitted on all 64) or 16 (below 60, cross-fitted: every frame fitted, each held
    out once). Only the size is changed, to keep it
    quick."""
    from engines.training.train import Progress, train_bundle

    frames = tmp_path_factory.mktemp("auto-good")
    SyntheticLine(96, 96, seed=3).write_folder(frames, request.param)
    out = tmp_path_factory.mktemp("auto") / "bundle"
    train_bundle(frames, out, recipe="auto", size=(SIZE, SIZE), seed=5, progress=Progress(enabled=False))
    return out, frames


def test_teach_with_the_default_holdout_refits_what_recipe_auto_fitted_on_the_same_frames(auto_trained, tmp_path):
    """Recipe auto fits on every frame, its held-out frames scored by the fit without them: teach on the same
    frames with the default holdout splits them as the manifest says train did, so it fits on the same frames, gets
    the same parameters and sets its thresholds on the same held-out scores (each frame's out-of-fold score where
    train cross-fitted)."""
    import shutil

    from calibration.teach import teach

    trained_dir, frames = auto_trained
    bundle = tmp_path / "b"
    shutil.copytree(trained_dir, bundle)
    before = load_bundle(bundle)
    training = before.manifest["training"]
    assert (training["split"], training["holdout"]) == ("validation_folds", 0.1)
    n = len(list(frames.glob("*.png")))
    expected = (64, 24) if n == 64 else (n, n)
    assert (training["n_fit"], training["n_holdout"]) == expected

    out = io.StringIO()
    taught = teach(bundle, frames, by="tester", out=out)
    record = taught.manifest["teach"]["frames"]
    assert (record["n_fit"], record["n_holdout"]) == expected
    assert (record["split"], record["holdout"], record["folds"]) == ("validation_folds", 0.1, 1 if n == 64 else 4)
    trained_params = before.scorer_params()
    params = taught.scorer_params()
    assert params.keys() == trained_params.keys()
    for name, value in params.items():
        assert value.shape == trained_params[name].shape, name
        np.testing.assert_allclose(value, trained_params[name], rtol=2e-3, atol=2e-4 * float(np.abs(value).max()))
    # The held-out scores train set its first thresholds on, now by ONNX Runtime: the same frames, by the same fits.
    got, want = taught.thresholds().provenance["good_scores"], before.thresholds().provenance["good_scores"]
    assert got["n"] == want["n"] == expected[1]
    np.testing.assert_allclose(got["quantiles"], want["quantiles"], rtol=2e-3, atol=1e-4 * max(want["quantiles"]))
    # Teaching on any other number of frames splits them as a station's (split_holdout at 0.2), whatever auto holds
    # out at that number: the hint counts with that.
    warning = next(line for line in out.getvalue().splitlines() if "the target needs >= 2995 good frames" in line)
    assert warning.endswith(
        f" (held out as train held out for recipe auto on its {n} frames; any other number is held out 0.2 by "
        "split_holdout: teach on >= 14973 frames)"
    ), warning
    if n == 64:
        assert (
            "refitted on 64 frames in" in out.getvalue()
            and "24 of them also held out for the thresholds (scored by a fit on the other frames, as train does for "
            "recipe auto)"
            in out.getvalue()
        ), out.getvalue()
    else:
        assert "refitted on 16 frames" in out.getvalue() and "each also held out once" in out.getvalue()


def test_a_cross_fitted_teach_records_and_reports_out_of_fold_scores_and_says_when_the_current_row_is_in_sample(
    auto_trained, tmp_path
):
    """Teach fits recipe auto's bundle on every frame (cross-fitted below 60 frames, one held-out share above): the
    taught row and the thresholds' reference are out-of-fold scores (each held-out frame's by the fold fit without
    it), recorded and reported as such, as train records them. Where the frames are
    those the current scorer was fitted on (train's or its teach's record names them by checksum), its row is
    in-sample, and the report says on how many, rather than let a lower current row read as a worse taught model."""
    import shutil

    from calibration.teach import teach

    trained_dir, frames = auto_trained
    n = len(list(frames.glob("*.png")))
    bundle = tmp_path / "b"
    shutil.copytree(trained_dir, bundle)
    out = io.StringIO()
    taught = teach(bundle, frames, by="tester", out=out)
    comparison = taught.manifest["teach"]["comparison"]
    held = 24 if n == 64 else n
    assert taught.thresholds().provenance["images"] == "out-of-fold"
    assert load_bundle(trained_dir).thresholds().provenance["images"] == "out-of-fold"  # train's word for them
    assert comparison["taught"]["scores"] == "out-of-fold"
    # Train's scorer was fitted on every one of them, and its record names them.
    assert comparison["current"]["in_sample"] == held
    text = out.getvalue()
    assert f"on the {held} frames, each held out of one fold:\n  current              threshold" in text, text
    assert "\n  taught (out-of-fold) threshold" in text, text
    others = "the frames not held out" if n == 64 else "the other 3 folds' frames"
    assert (
        f"  taught (out-of-fold): each frame scored by the fit on {others}, as the thresholds are set, not by the "
        "taught model, which was fitted on all of them"
    ) in text, text
    assert (
        f"  current (in-sample): fitted on {held} of these {held} frames, so it scores them lower than new ones: a "
        "lower row here does not make the taught model worse"
    ) in text, text

    # Taught again on the same frames: the current scorer is the first teach's, fitted on every one of them.
    out = io.StringIO()
    again = teach(bundle, frames, by="tester", out=out)
    assert again.manifest["teach"]["comparison"]["current"]["in_sample"] == held

    # A train record that names no frames (an older bundle), or names these by their names alone: not known, and
    # the report says what that would mean.
    for name, drop in (("unnamed", ("names_sha256", "pixels_sha256")), ("names-only", ("pixels_sha256",))):
        older = tmp_path / name
        shutil.copytree(trained_dir, older)
        manifest = json.loads((older / MANIFEST).read_text())
        assert {"names_sha256", "pixels_sha256"} <= set(manifest["training"])
        manifest["training"] = {k: v for k, v in manifest["training"].items() if k not in drop}
        (older / MANIFEST).write_text(json.dumps(manifest))
        out = io.StringIO()
        taught = teach(older, frames, by="tester", out=out)
        assert taught.manifest["teach"]["comparison"]["current"]["in_sample"] is None
        assert (
            "  current: in-sample (scored lower than new frames) on any of these frames it was fitted on; its record "
            "does not say which frames those were"
        ) in out.getvalue(), out.getvalue()


def test_a_teach_with_another_holdout_counts_the_held_out_frames_train_fitted_the_current_scorer_on(
    trained, good, tmp_path
):
    """One held-out share, not cross-fitted: teach's held-out frames are drawn with its own --holdout, and those of
    them that train fitted on (train's split rebuilt from its record: kind, share, seed) are in-sample for the
    current row, counted and said."""
    import shutil

    from calibration.teach import teach
    from engines.data.images import list_images, split_holdout

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    training = load_bundle(bundle).manifest["training"]
    assert (training["split"], training["holdout"], training["seed"]) == ("split_holdout", HOLDOUT, 5)
    n = len(list_images(good))
    train_fit, _ = split_holdout(n, HOLDOUT, 5)
    _, teach_held = split_holdout(n, 0.3, 5)
    expected = len(set(train_fit.tolist()) & set(teach_held.tolist()))
    assert 0 < expected < len(teach_held)  # some of each, so a wrong seed or share shows
    out = io.StringIO()
    taught = teach(bundle, good, holdout=0.3, by="tester", out=out)
    assert taught.manifest["teach"]["comparison"]["current"]["in_sample"] == expected
    assert f"  current (in-sample): fitted on {expected} of these {len(teach_held)} frames" in out.getvalue()


def test_the_default_holdout_is_the_one_train_held_out(trained, good, tmp_path):
    """A bundle trained with --holdout 0.25 is taught with 0.25 by default; one trained before the share was
    recorded, with the share its counts give (4 of 16); one that says neither, with 0.2; one trained on every frame
    (--holdout 0), with 0.2 and a line saying that teach then fits on fewer frames than train did."""
    import shutil

    from calibration.teach import teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")

    def taught_with(name: str, drop: tuple[str, ...] = (), **training) -> tuple[dict, str]:
        bundle = tmp_path / name
        shutil.copytree(trained, bundle)
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["training"] = {k: v for k, v in {**manifest["training"], **training}.items() if k not in drop}
        (bundle / MANIFEST).write_text(json.dumps(manifest))
        out = io.StringIO()
        frames = teach(bundle, good, by="tester", out=out).manifest["teach"]["frames"]
        return frames, out.getvalue()

    frames, _ = taught_with("recorded")
    assert (frames["n_fit"], frames["n_holdout"], frames["split"], frames["holdout"]) == (12, 4, "split_holdout", 0.25)
    frames, _ = taught_with("counted", drop=("split", "holdout"))
    assert (frames["n_fit"], frames["holdout"]) == (12, 0.25)
    frames, _ = taught_with("unknown", drop=("split", "holdout", "n_fit", "n_holdout"))
    assert (frames["n_fit"], frames["holdout"]) == (13, 0.2)
    frames, out = taught_with("all-fitted", holdout=0.0)
    assert (frames["n_fit"], frames["holdout"]) == (13, 0.2)
    assert "train held no frames out (--holdout 0) and fitted on all of them; teach holds out 0.2" in out, out
    # Other frames than train's (a station's): the share the thresholds want, whatever train held out.
    station = tmp_path / "station"
    station.mkdir()
    for path in sorted(Path(good).iterdir())[:-1]:
        shutil.copy(path, station / path.name)
    bundle = tmp_path / "station-bundle"
    shutil.copytree(tmp_path / "recorded", bundle)
    frames = teach(bundle, station, by="tester", out=io.StringIO()).manifest["teach"]["frames"]
    assert (frames["split"], frames["holdout"]) == ("split_holdout", 0.2), frames


def held_out(split, n: int) -> int:
    return sum(len(held) for _, held in split.folds(n, 5)[1])


@pytest.mark.parametrize("needed", [8, 24, 25, 29, 59, 60, 80, 81, 2995])
def test_the_too_few_warning_of_a_recipe_auto_bundle_names_only_frame_counts_that_hold_out_enough(needed):
    """Recipe auto's folds hold out every frame below 60 frames, then one share of 24 to 80: the count falls at 60, so
    "teach on >= N" is false for 25 to 59 held-out frames. Where the manifest records train's counts, only that many
    frames are split as auto split them and any other number as a station's (split_holdout at 0.2). The hint names
    just the frame counts that hold out `needed`, checked against the split teach makes of every count up to 1000."""
    from types import SimpleNamespace

    from calibration import teach

    auto = {"recipe_selection": {"folds": 1}, "training": {"split": "validation_folds", "holdout": 0.1}}
    # Without train's counts (a manifest that lacks them), auto's folds split every count.
    uncounted = SimpleNamespace(path=Path("uncounted"), manifest=auto)
    fewest = teach.frames_to_hold(needed, 0.1, "validation_folds")
    below = teach.cross_fitted_frames(needed)
    for n in range(2, 1001):
        named = (below is not None and n in below) or (fewest is not None and n >= fewest)
        assert (held_out(teach.training_split(uncounted, None, n), n) >= needed) == named, (needed, n)
    how = " (held out as train held out for recipe auto: "
    hint = teach._teach_on(needed, teach.training_split(uncounted, None, 40))
    assert hint == {
        8: f"{how}teach on >= 8 frames)",
        24: f"{how}teach on >= 24 frames)",
        25: f"{how}teach on 25 to 59 frames, cross-fitted so that every frame is held out once, or on >= 246)",
        29: f"{how}teach on 29 to 59 frames, cross-fitted so that every frame is held out once, or on >= 286)",
        59: f"{how}teach on 59 frames, cross-fitted so that every frame is held out once, or on >= 586)",
        60: f"{how}teach on >= 595 frames)",
        80: f"{how}teach on >= 795 frames)",
    }.get(
        needed,
        f"{how}at most 80 frames however many are taught on; `inspectd calibrate --good` then sets the thresholds "
        "on as many other good frames as needed)",
    ), hint

    # Trained on 64 frames (40 fitted, 24 held out): those 64 are split as auto split them, every other count not.
    counted = SimpleNamespace(
        path=Path("counted"), manifest={**auto, "training": {**auto["training"], "n_fit": 40, "n_holdout": 24}}
    )
    fewest = teach.frames_to_hold(needed, 0.2)
    for n in range(2, 1001):
        if n != 64:
            assert (held_out(teach.training_split(counted, None, n), n) >= needed) == (n >= fewest), (needed, n)
    other = " other than 64" if fewest <= 64 else ""
    assert teach._teach_on(needed, teach.training_split(counted, None, 64)) == (
        f" (held out as train held out for recipe auto on its 64 frames; any other number is held out 0.2 by "
        f"split_holdout: teach on >= {fewest} frames{other})"
    )


def test_the_split_names_bundles_record_are_fixed_strings_not_function_names(monkeypatch):
    """train records, and teach reads, the split by a name of its own: a function renamed changes neither, so the
    bundles already written are still split as train split them."""
    from types import SimpleNamespace

    from calibration import teach
    from engines.data import images

    assert (images.SPLIT_HOLDOUT, images.VALIDATION_FOLDS) == ("split_holdout", "validation_folds")
    assert teach.SPLITS == ("split_holdout", "validation_folds")
    monkeypatch.setattr(images.validation_folds, "__name__", "renamed_folds")
    monkeypatch.setattr(images.split_holdout, "__name__", "renamed_holdout")
    bundle = SimpleNamespace(
        path=Path("b"), manifest={"recipe_selection": {"folds": 1}, "training": {"split": "validation_folds"}}
    )
    split = teach.training_split(bundle, None, 64)
    assert split.kind == "validation_folds" and split.auto
    assert teach.training_split(bundle, 0.3, 64).kind == "split_holdout"
    assert teach.frames_to_hold(29, 0.1, "validation_folds") == 286


def test_train_s_frames_of_an_auto_bundle_fitted_on_every_image_are_all_fitted_again():
    """Auto's bundles are fitted on every image, one held-out share's included (`training.fit_all`): teach on train's
    64 frames fits all 64 and scores the 24 held out by the fold fit without them, as train did; a bundle written
    before that field (fitted on the share's 40 alone) is refitted on those 40, so teaching train's frames again
    still gives train's parameters. Which frames the current model was fitted on follows the same record."""
    from types import SimpleNamespace

    from calibration import teach

    auto = {"split": "validation_folds", "holdout": 0.1, "n_holdout": 24}
    one_fold = {"folds": 1}
    new = SimpleNamespace(
        path=Path("new"), manifest={"recipe_selection": one_fold, "training": {**auto, "n_fit": 64, "fit_all": True}}
    )
    old = SimpleNamespace(path=Path("old"), manifest={"recipe_selection": one_fold, "training": {**auto, "n_fit": 40}})
    for bundle, fitted in ((new, 64), (old, 40)):
        split = teach.training_split(bundle, None, 64)
        assert (split.kind, split.train_n) == ("validation_folds", 64), bundle.path
        fit, folds = split.folds(64, 5)
        assert len(fit) == fitted and len(folds) == 1 and len(folds[0][0]) == 40 and len(folds[0][1]) == 24
        assert not set(folds[0][0]) & set(folds[0][1])
    # Another count is a station's, as before: split_holdout at 0.2, whatever train fitted.
    assert teach.training_split(new, None, 63).kind == "split_holdout"


def test_an_export_says_and_records_when_the_frames_it_teaches_on_were_captured(trained, good, tmp_path, capsys):
    """An export appends to its folder: exported into twice, it holds both spans' frames, and the lineage rule keeps
    the older span's too, and --any-model takes them all. The capture span of the frames taught on (from
    archive.jsonl) is printed and recorded as --archive records its span (`since`/`until`, UTC to the second, `until`
    excluded), a span that takes the same frames from the archive (here two archives: one archive exported twice
    would hold more between the two spans), with the advice to export each span into a fresh folder. A row whose
    time no date holds (a hand-edited manifest) is still the export's frame, outside the span, and said so."""
    import datetime
    import math

    from calibration import teach
    from inspectd.protocol.archive import ArchiveReader, parse_time

    bundle, original, images = memory_copy(trained, good, tmp_path)
    earlier = archive_of(tmp_path / "earlier", [(image, original) for image in images[:8]], ago=2 * 3600)
    later = archive_of(tmp_path / "later", [(image, original) for image in images[8:]])
    export = export_of(tmp_path / "earlier", tmp_path / "export")
    export_of(tmp_path / "later", export)
    times = []
    for archive in ("earlier", "later"):
        with ArchiveReader(tmp_path / archive) as reader:
            times += [e.t_capture for e in reader.query()]

    def iso(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")

    since, until = iso(min(times)), iso(math.floor(max(times)) + 1)
    assert teach.run(args(bundle, good=str(export))) == 0
    out = capsys.readouterr().out
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 16 and (frames["since"], frames["until"]) == (since, until), frames
    provenance = load_bundle(bundle).thresholds().provenance  # as an --archive teach's thresholds say it
    assert (provenance["since"], provenance["until"]) == (since, until), provenance
    assert (
        f"frames: the 16 frame(s) taught on were captured from {since} to {until} (by archive.jsonl); they come from "
        f"2 exports of 2 separate spans into {export}, which adds to the frames exported into it before: export each "
        "span into a fresh folder"
    ) in out, out
    assert (frames["export_runs"], frames["export_spans"]) == (2, 2), frames
    # The span --archive would take the same frames from.
    for archive, ids in (("earlier", earlier), ("later", later)):
        with ArchiveReader(tmp_path / archive) as reader:
            found = reader.query(since=parse_time(since, "--since"), until=parse_time(until, "--until"))
            assert [e.id for e in found] == ids

    # --any-model takes the older span's frames just the same: its span and its exports are said too.
    assert teach.run(args(bundle, good=str(export), any_model=True)) == 0
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 16 and (frames["since"], frames["until"]) == (since, until), frames
    out = capsys.readouterr().out
    assert f"captured from {since} to {until}" in out and "they come from 2 exports" in out, out

    # The newest frame's time made absurd, another's removed: 14 of the 16 give the span, the later archive's first
    # 7 and the earlier's 8.
    rows = [json.loads(line) for line in (export / "archive.jsonl").read_text().splitlines()]
    newest = max(rows, key=lambda row: row["t_capture"])
    newest["t_capture"] = 1e300
    del min(rows, key=lambda row: row["t_capture"])["t_capture"]
    (export / "archive.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    timed = sorted(times)[1:-1]
    assert teach.run(args(bundle, good=str(export))) == 0
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert (frames["n"], frames["n_captured"]) == (16, 14), frames
    assert (frames["since"], frames["until"]) == (iso(min(timed)), iso(math.floor(max(timed)) + 1)), frames
    assert "frames: 14 of the 16 frame(s) taught on were captured from" in capsys.readouterr().out


def test_good_on_an_archive_export_takes_only_the_frames_of_this_bundles_model_and_those_it_was_taught_from(
    trained, good, tmp_path, capsys
):
    """`inspectd archive export` of a span across a changeover, then `teach --good` on it: its archive.jsonl names the
    model that judged each frame, so the other product's frames are left out as --archive leaves them out (said,
    recorded), --any-model takes them, an export of other models' frames only is refused in one line and nothing is
    written; --any-model on a folder that is not an export is refused."""
    import hashlib

    from calibration import teach
    from inspectd.protocol.archive import ArchiveReader

    bundle, original, images = memory_copy(trained, good, tmp_path)
    owners = ["m-a"] * 4 + [original] * 12  # the other product's, then this bundle's
    ids = archive_of(tmp_path / "archive", list(zip(images, owners, strict=True)))
    ours = [i for i, owner in zip(ids, owners, strict=True) if owner != "m-a"]
    export = tmp_path / "export"
    exported = inspectd(
        "archive", "export", str(export), "--archive", str(tmp_path / "archive"), "--since", "1h",
        "--verdict", "ok", "--split", "train",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.stem for p in (export / "train" / "good").glob("*.png")) == ids

    assert teach.run(args(bundle, good=str(export))) == 0
    out = capsys.readouterr().out
    taught = load_bundle(bundle)
    frames = taught.manifest["teach"]["frames"]
    assert frames["n"] == 12 and frames["other_models"] == {"m-a": 4} and frames["model_ids"] == [original]
    assert frames["names_sha256"] == hashlib.sha256("\n".join(f"{i}.png" for i in ours).encode()).hexdigest()
    assert frames["export"] == str((export / "archive.jsonl").resolve())
    assert (
        f"frames: left out 4 frame(s) in {(export / 'train' / 'good').resolve()} judged by other models (4 of model "
        "m-a): --any-model takes them"
    ) in out

    # The export's good folder itself is the same export; --any-model takes every model's frames, as --archive does.
    assert teach.run(args(bundle, good=str(export / "train" / "good"), any_model=True)) == 0
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 16 and frames["model_ids"] is None
    assert frames["other_models"] is None and frames["not_in_export"] is None
    assert "left out" not in capsys.readouterr().out

    others = archive_of(tmp_path / "others", [(image, "m-a" if i % 3 else "m-c") for i, image in enumerate(images)])
    with ArchiveReader(tmp_path / "others") as reader:
        assert reader.export(reader.query(verdict="ok"), tmp_path / "other-export", "train") == len(others)
    before = load_bundle(bundle)
    assert teach.run(args(bundle, good=str(tmp_path / "other-export"))) == 2
    line = refusal(capsys)
    assert line.startswith(f"inspectd teach: --good {tmp_path / 'other-export'} (train/good): 0 good frame(s) of "
                           f"model {before.model_id} or the models it was taught from ("), line  # fmt: skip
    assert "(10 of model m-a, 6 of model m-c left out)" in line and "--any-model" in line, line
    assert load_bundle(bundle).manifest == before.manifest

    assert teach.run(args(bundle, good=str(good), any_model=True)) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"inspectd teach: --any-model: --good {good} is not an `inspectd archive export` (no archive.jsonl names the "
        "model that judged its frames), expected --archive [DIR] or an export"
    )
    assert load_bundle(bundle).manifest == before.manifest


def test_rows_of_takes_the_frames_asked_for_and_their_copies():
    """Features of 5 fitted frames, then of their 5 copies (an augmenting recipe's): a fold's frames are rows of both
    halves, in the same order."""
    from calibration.teach import rows_of

    features = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    rows = rows_of(features, np.array([0, 2, 3, 5, 7]), np.array([2, 7]))
    np.testing.assert_array_equal(rows[:, 0], [1, 4, 6, 9])


def export_of(archive: Path, out: Path) -> Path:
    """`inspectd archive export OUT --split train` of every frame in `archive`, good and defect."""
    from inspectd.protocol.archive import ArchiveReader

    with ArchiveReader(archive) as reader:
        entries = reader.query()
        assert reader.export(entries, out, "train") == len(entries)
    return out


def test_an_export_reviewed_by_hand_keeps_the_frames_moved_into_good_and_leaves_out_those_it_does_not_name(
    trained, good, tmp_path, capsys
):
    """The review of an export moves the false rejects from train/defect into train/good: they were judged by the
    bundle's model, wherever they now lie, so they are taught on; one of another model moved there is left out with
    that model's frames, counted as what it is (a frame in the good folder, not a frame that model judged good). A
    frame copied in by hand is named by no row of archive.jsonl: it is left out, said as such (not as a frame of an
    unknown model), and an export of such frames only is refused in one line saying so, not advising another span.
    --any-model takes them all and records that it looked none of them up."""
    import hashlib
    import shutil

    import cv2

    from calibration import teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    original = load_bundle(bundle).model_id
    files = sorted(good.glob("*.png"))
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files]
    owners = ["m-a"] * 4 + [original] * 12
    ids = archive_of(tmp_path / "archive", list(zip(images, owners, strict=True)), defects=(3, 14, 15))
    export = export_of(tmp_path / "archive", tmp_path / "export")
    good_dir = export / "train" / "good"
    for moved in (ids[14], ids[3]):  # this model's false reject, and a frame model m-a judged defect
        (export / "train" / "defect" / f"{moved}.png").rename(good_dir / f"{moved}.png")
    shutil.copy(files[0], good_dir / "extra.png")
    # A second copy of an exported frame under another extension is no exported frame (else fitted and held out).
    shutil.copy(good_dir / f"{ids[5]}.png", good_dir / f"{ids[5]}.jpg")

    assert teach.run(args(bundle, good=str(export))) == 0
    out = capsys.readouterr().out
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    kept = sorted(f"{i}.png" for i in ids[4:15])
    assert frames["n"] == 11 and frames["other_models"] == {"m-a": 4}, frames
    assert frames["not_in_export"] == 2, frames
    assert frames["names_sha256"] == hashlib.sha256("\n".join(kept).encode()).hexdigest()
    assert (
        f"frames: left out 4 frame(s) in {good_dir.resolve()} judged by other models (4 of model m-a): --any-model "
        "takes them"
    ) in out, out
    assert (
        "frames: left out 2 frame(s) not named in archive.jsonl (added by hand, renamed, or the export cut off?): "
        "--any-model takes them"
    ) in out
    assert "unknown" not in out, out

    by_hand = tmp_path / "by-hand"
    (by_hand / "train" / "good").mkdir(parents=True)
    shutil.copy(export / "archive.jsonl", by_hand / "archive.jsonl")
    for path in files[:3]:
        shutil.copy(path, by_hand / "train" / "good" / path.name)
    before = load_bundle(bundle)
    assert teach.run(args(bundle, good=str(by_hand))) == 2
    line = refusal(capsys)
    assert line == (
        f"inspectd teach: --good {by_hand} (train/good): 0 good frame(s) of model {before.model_id} or the models it "
        f"was taught from ({original}): none of its 3 frame(s) is named in archive.jsonl (added by hand, renamed, or "
        "the export cut off?), expected frames `inspectd archive export` wrote, which it names with the model that "
        "judged each, or --any-model to take them"
    )
    # A manifest that names no frame at all: the export itself was cut off, and exporting again is what helps.
    (by_hand / "archive.jsonl").write_bytes(b"")
    assert teach.run(args(bundle, good=str(by_hand))) == 2
    line = refusal(capsys)
    assert line == (
        f"inspectd teach: --good {by_hand} (train/good): {by_hand / 'archive.jsonl'} names no frame (its export cut "
        "off?), expected a row per frame as `inspectd archive export` writes them: export again, or --any-model to "
        "take the frames"
    )
    assert load_bundle(bundle).manifest == before.manifest

    # Every frame of the folder, named or not; whose they are was not looked up, and the record says so (null),
    # not that none was another model's or unnamed.
    assert teach.run(args(bundle, good=str(export), any_model=True)) == 0
    out = capsys.readouterr().out
    assert "frames: left out" not in out, out
    # 17 files, two of them byte copies of others (extra.png, the .jpg): left out as train leaves them out, and counted.
    assert "note: 2 duplicate image(s) left out: " in out, out
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 15 and frames["n_duplicates"] == 2 and frames["model_ids"] is None, frames
    assert frames["other_models"] is None and frames["not_in_export"] is None, frames


def test_an_export_is_recognised_however_its_good_folder_is_typed(good, tmp_path, monkeypatch):
    """`cd export/train && teach --good good`, or --good a link to export/train/good: the same export, so its
    frames are kept by the model that judged them as with the folder's full path."""
    import cv2

    from calibration.teach import folder_frames

    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(good.glob("*.png"))[:8]]
    ids = archive_of(tmp_path / "archive", [(image, "m-a" if i < 4 else "m-b") for i, image in enumerate(images)])
    export = export_of(tmp_path / "archive", tmp_path / "export")
    link = tmp_path / "mine"
    link.symlink_to(export / "train" / "good")
    monkeypatch.chdir(export / "train")
    for typed in ("good", link):
        frames = folder_frames(typed, ["m-b"])
        assert [p.stem for p in frames.paths] == ids[4:], typed
        assert frames.record["other_models"] == {"m-a": 4}, typed
        assert frames.record["export"] == str((export / "archive.jsonl").resolve()), typed
    # The export's good folder itself a link to storage elsewhere: recognised by the path as given.
    elsewhere = tmp_path / "nas" / "reviewed"
    elsewhere.parent.mkdir()
    (export / "train" / "good").rename(elsewhere)
    (export / "train" / "good").symlink_to(elsewhere)
    for typed in ("good", export / "train" / "good", export):
        frames = folder_frames(typed, ["m-b"])
        assert [p.stem for p in frames.paths] == ids[4:], typed
        assert frames.record["other_models"] == {"m-a": 4}, typed


def test_an_archive_jsonl_teach_cannot_read_is_named_in_one_line(open_tmp_path):
    """`sudo -u inspectd teach --good` on an export written by another user with a 0600 archive.jsonl: one line
    naming the file and why, as for an image folder it cannot read, before any work."""
    from PIL import Image

    from other_user import as_nobody
    from test_bundle_writes import make

    shared = open_tmp_path / "shared"
    shared.mkdir()
    bundle = make(shared / "b")
    export = shared / "export"
    (export / "train" / "good").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 100 + i, np.uint8)).save(export / "train" / "good" / f"f{i}.png")
    manifest = export / "archive.jsonl"
    manifest.write_text(json.dumps({"id": "f0", "model_id": "m", "exported_to": "train/good"}) + "\n")
    # As root, as_nobody's user is neither owner nor group; as another user, this user is the owner.
    manifest.chmod(0o600 if os.geteuid() == 0 else 0o000)
    done = subprocess.run(
        as_nobody([sys.executable, "-m", "inspectd", "teach", str(bundle), "--good", str(export)]),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.strip() == f"inspectd teach: {manifest.resolve()}: cannot read (Permission denied)"


def test_the_fresh_folder_advice_is_given_only_when_the_frames_taught_on_come_from_more_than_one_export(
    trained, good, tmp_path, capsys
):
    """A fresh folder of one export is what the advice asks for: its span is said and the advice is not, with or
    without --any-model. Rows of an export from before runs were recorded (no export_run) count as one run. Exported
    into again with another model's frames, the lineage rule keeps the first export's frames only: still no advice;
    --any-model takes both exports' frames: the advice, and that it took two models' frames."""
    from calibration import teach

    bundle, original, images = memory_copy(trained, good, tmp_path)
    archive_of(tmp_path / "first", [(image, original) for image in images[:8]], ago=2 * 3600)
    archive_of(tmp_path / "second", [(image, "m-b") for image in images[8:]])
    export = export_of(tmp_path / "first", tmp_path / "export")

    def taught(**kw) -> tuple[dict, str]:
        assert teach.run(args(bundle, good=str(export), **kw)) == 0
        return load_bundle(bundle).manifest["teach"]["frames"], capsys.readouterr().out

    for any_model in (False, True):
        frames, out = taught(any_model=any_model)
        assert frames["n"] == 8 and frames["export_runs"] == 1 and frames["since"], frames
        assert "frame(s) taught on were captured from" in out and "fresh folder" not in out, out
        assert "--any-model took" not in out, out

    manifest = export / "archive.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len({row.pop("export_run") for row in rows}) == 1  # as an older inspectd wrote them
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    frames, out = taught()
    assert frames["export_runs"] == 1 and "fresh folder" not in out, out

    export_of(tmp_path / "second", export)
    frames, out = taught()
    assert frames["n"] == 8 and frames["export_runs"] == 1 and frames["other_models"] == {"m-b": 8}, frames
    assert "fresh folder" not in out, out
    frames, out = taught(any_model=True)
    assert frames["n"] == 16 and frames["export_runs"] == 2, frames
    assert (
        f"they come from 2 exports of 2 separate spans into {export}, which adds to the frames exported into it "
        f"before: export each span into a fresh folder; --any-model took frames judged by 2 models (8 of model "
        f"{original}, 8 of model m-b)"
    ) in out, out


def test_one_span_exported_camera_by_camera_into_one_fresh_folder_gets_no_fresh_folder_advice(
    trained, good, tmp_path, capsys
):
    """`inspectd archive export --camera` once per camera into one fresh folder: two export runs, but of one span
    (each camera's frames interleave in it), so the advice to export each span into a fresh folder, which this
    folder already is, is not given; the record counts the runs and the one span."""
    from calibration import teach
    from inspectd.protocol.archive import ArchiveReader

    bundle, original, images = memory_copy(trained, good, tmp_path)
    archive_of(tmp_path / "archive", [(image, original) for image in images], cameras=("cam0", "cam1"))
    export = tmp_path / "export"
    with ArchiveReader(tmp_path / "archive") as reader:
        for camera in ("cam0", "cam1"):
            assert reader.export(reader.query(camera=camera), export, "train") == 8
    assert teach.run(args(bundle, good=str(export))) == 0
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 16 and frames["export_runs"] == 2 and frames["export_spans"] == 1, frames
    out = capsys.readouterr().out
    assert "frame(s) taught on were captured from" in out and "fresh folder" not in out, out


def test_the_reviews_ok_and_defect_exports_of_one_span_are_one_span_whichever_false_rejects_are_moved_into_good(
    trained, good, tmp_path, capsys
):
    """The review DEPLOY.md prescribes: the span's ok frames exported with --split train, its defect frames over the
    same span with --add into the same folder, the false rejects moved into train/good. Here those are the first
    three frames, captured before any ok frame, so the frames kept of the defect export lie apart from the ok
    export's; yet both runs wrote rows over one span (a later defect too), so it is one span, and the advice to
    export each span into a fresh folder is not given."""
    from calibration import teach
    from inspectd.protocol.archive import ArchiveReader

    bundle, original, images = memory_copy(trained, good, tmp_path)
    ids = archive_of(tmp_path / "archive", [(image, original) for image in images], defects=(0, 1, 2, 9))
    export = tmp_path / "review"
    with ArchiveReader(tmp_path / "archive") as reader:
        assert reader.export(reader.query(verdict="ok"), export, "train") == 12
        assert reader.export(reader.query(verdict="defect"), export, "train") == 4
    for moved in ids[:3]:
        (export / "train" / "defect" / f"{moved}.png").rename(export / "train" / "good" / f"{moved}.png")
    assert teach.run(args(bundle, good=str(export))) == 0
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 15 and frames["export_runs"] == 2 and frames["export_spans"] == 1, frames
    out = capsys.readouterr().out
    assert "frame(s) taught on were captured from" in out and "fresh folder" not in out, out


def test_a_teach_on_a_wider_export_than_the_archive_teach_before_it_counts_the_frames_that_teach_fitted(
    trained, good, tmp_path, capsys
):
    """DEPLOY.md's flow: teach --archive on a span, then teach --good on an export of a wider span. Not the frames
    the current scorer was fitted on, but some of them: its record names them by archive id, the export by file
    name, so the held-out ones it was fitted on are counted and said (its row is in-sample for them). Taught again on
    that export less a few frames, the current record (the export teach's) names no ids: the row says its record
    does not say which frames it was fitted on, on a one-share split as on cross-fitted ones."""
    import datetime
    import math

    from calibration import teach
    from engines.data.images import split_holdout
    from inspectd.protocol.archive import ArchiveReader

    bundle, original, images = memory_copy(trained, good, tmp_path)
    ids = archive_of(tmp_path / "archive", [(image, original) for image in images])
    with ArchiveReader(tmp_path / "archive") as reader:
        twelfth = reader.get(ids[12]).t_capture
    until = datetime.datetime.fromtimestamp(math.floor(twelfth), datetime.timezone.utc).isoformat(timespec="seconds")
    assert teach.run(args(bundle, archive=str(tmp_path / "archive"), since="1h", until=until)) == 0
    first = load_bundle(bundle).manifest["teach"]["frames"]
    assert sorted(first["ids"]) == sorted(ids[:12]) and first["split"] == "split_holdout", first
    capsys.readouterr()

    export = export_of(tmp_path / "archive", tmp_path / "export")
    fit, _ = split_holdout(12, HOLDOUT, 5)
    fitted = {first["ids"][i] for i in fit}
    names = sorted(path.stem for path in (export / "train" / "good").glob("*.png"))
    _, held = split_holdout(16, HOLDOUT, 5)
    expected = sum(names[i] in fitted for i in held)
    assert 0 < expected < len(held)  # some of each, so a wrong split or order shows
    assert teach.run(args(bundle, good=str(export))) == 0
    assert load_bundle(bundle).manifest["teach"]["comparison"]["current"]["in_sample"] == expected
    out = capsys.readouterr().out
    assert f"  current (in-sample): fitted on {expected} of these {len(held)} frames" in out, out

    for name in names[:3]:
        (export / "train" / "good" / f"{name}.png").unlink()
    assert teach.run(args(bundle, good=str(export))) == 0
    assert load_bundle(bundle).manifest["teach"]["comparison"]["current"]["in_sample"] is None
    out = capsys.readouterr().out
    assert (
        "  current: in-sample (scored lower than new frames) on any of these frames it was fitted on; its record "
        "does not say which frames those were"
    ) in out, out


def test_a_camera_the_span_does_not_hold_is_named_with_the_cameras_it_does_and_a_backwards_span_is_refused(
    trained, good, tmp_path, capsys
):
    """A --camera typo (another case, a camera that is not there) finds no frame however long the span: the refusal
    names the cameras the span holds, with their good frames, instead of sending the operator after a longer span.
    An --until at or before --since is refused up front in one line, before the bundle is read; nothing is written."""
    from calibration import teach

    bundle, original, images = memory_copy(trained, good, tmp_path)
    archive_of(tmp_path / "archive", [(image, original) for image in images[:12]], cameras=("cam0", "cam1"))
    archive = str(tmp_path / "archive")

    for typo in ("cam9", "CAM0"):
        assert teach.run(args(bundle, archive=archive, since="1h", camera=typo)) == 2
        line = capsys.readouterr().err.strip()
        assert (
            "\n" not in line and f"no good frame of camera {typo} in the span, which holds cam0 (6), cam1 (6)" in line
        )
        assert "a longer span" not in line, line

    assert teach.run(args(bundle, archive=archive, since="1h", camera="cam0", until="2h")) == 2
    line = capsys.readouterr().err.strip()
    assert line == (
        "inspectd teach: --since 1h --until 2h: the span ends at or before it starts, expected --until after --since"
    )
    assert (
        teach.run(args(tmp_path / "no-bundle", archive=archive, since="2026-03-01T06:00", until="2026-03-01T06:00"))
        == 2
    )
    assert "the span ends at or before it starts" in capsys.readouterr().err, "checked before the bundle is read"
    assert load_bundle(bundle).model_id == original


def test_a_camera_whose_every_frame_in_the_span_was_rejected_is_not_taken_for_a_typo(trained, good, tmp_path, capsys):
    """After a product change the model rejects every good part of a camera: its frames are all in the span, judged
    defect. The refusal says so, with how many, and how to review them into a --good folder; neither a --camera typo
    nor a longer span, which the same model's rejects would fill as well. Nothing is written."""
    import shlex

    from calibration import teach
    from inspectd.cli import main

    bundle, original, images = memory_copy(trained, good, tmp_path)
    rejected = tuple(range(1, 12, 2))  # cam1's, as cam0 takes the even frames
    archive_of(tmp_path / "archive", [(image, original) for image in images[:12]], rejected, cameras=("cam0", "cam1"))
    archive = str(tmp_path / "archive")

    assert teach.run(args(bundle, archive=archive, since="1h", camera="cam1")) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "the span holds 6 frame(s) of camera cam1, none judged ok: " in line, line
    assert "--camera ids" not in line and "a longer span" not in line, line
    assert load_bundle(bundle).model_id == original
    # The review it points at runs as written.
    command = shlex.split(line.split("`")[1].replace("DIR", str(tmp_path / "review"), 1))
    assert command[:3] == ["inspectd", "archive", "export"] and main(command[1:]) == 0, command
    assert len(list((tmp_path / "review" / "train" / "defect").glob("*.png"))) == 6


@pytest.mark.parametrize(
    "since, until",
    [
        ("1h", "1h"),
        ("2h", "120m"),
        ("0s", "0s"),
        ("0s", None),
        ("2099-01-01T08:00", None),
        ("2099-01-01T08:00", "2099-01-02T08:00"),
    ],
)
def test_a_span_of_relative_times_that_holds_nothing_or_starts_in_the_future_is_refused(tmp_path, capsys, since, until):
    """Each relative time read the clock on its own, so --since 1h --until 1h was a span microseconds long, and a
    --since in the future (a day mistyped) a span ending before it starts: both were counted as too few frames, with
    the advice of a longer span. Refused up front in one line, before the bundle is read."""
    from calibration import teach

    code = teach.run(args(tmp_path / "no-bundle", archive=str(tmp_path / "archive"), since=since, until=until))
    line = capsys.readouterr().err
    assert code == 2 and line.count("\n") == 1, line
    if until is not None and not until.startswith("2099"):
        assert line == (
            f"inspectd teach: --since {since} --until {until}: the span ends at or before it starts, expected --until "
            "after --since\n"
        )
    else:
        assert line == (
            f"inspectd teach: --since {since}: now or in the future, expected a time in the past (nothing is archived "
            "from then yet)\n"
        )


def test_a_camera_teach_warns_of_the_other_cameras_good_frames_it_leaves_out_of_the_one_scorer(
    trained, good, tmp_path, capsys
):
    """Every camera is judged by the one scorer: --camera refits it on one camera's view, and a WARNING counts the
    good frames of the other cameras in the same span (of this bundle's lineage; of any model with --any-model) that
    the refit leaves out; the record keeps them. Without --camera nothing is left out and nothing is said."""
    from calibration import teach

    bundle, original, images = memory_copy(trained, good, tmp_path)
    owners = [original] * 12 + ["m-a"] * 4  # cam0 takes the even frames, cam1 the odd: 6 of this model each
    archive_of(tmp_path / "archive", list(zip(images, owners, strict=True)), cameras=("cam0", "cam1"))
    archive = str(tmp_path / "archive")

    for any_model, left_out in ((False, 6), (True, 8)):
        assert teach.run(args(bundle, archive=archive, since="1h", camera="cam0", any_model=any_model)) == 0
        out = capsys.readouterr().out
        frames = load_bundle(bundle).manifest["teach"]["frames"]
        assert frames["n"] == 6 + 2 * any_model and frames["other_cameras"] == {"cam1": left_out}, frames
        assert (
            f"WARNING: --camera cam0: {left_out} good frame(s) of other cameras in the same span ({left_out} of cam1) "
            "are left out of the refit, yet the one taught scorer judges every camera"
        ) in out, out

    assert teach.run(args(bundle, archive=archive, since="1h")) == 0
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 12 and frames["other_cameras"] is None, frames
    assert "other cameras" not in capsys.readouterr().out


def test_rollback_after_a_teach_killed_at_any_rename_puts_back_the_version_taught_from(tmp_path, capsys):
    """A teach in place killed at each of its renames (strace's fault injection, in a real child): wherever BUNDLE
    loads the taught version, `teach --rollback` puts back the version taught from, also after the kill between
    the exchange and the move into BUNDLE.versions, which leaves it under teach's staging name (`.NAME.teach-PID`)
    and says where it found it; where BUNDLE is still the old version, rollback says it was not taught."""
    from calibration import teach
    from test_bundle_writes import child, copy, make, renames_made

    original = make(tmp_path / "b")
    first = load_bundle(original).model_id
    counts = renames_made(TEACH_RECORDED, original, tmp_path / "counted")
    found_there = 0
    for call, total in counts.items():
        for k in range(1, total + 1):
            path = copy(original, tmp_path / f"{call}-{k}")
            killed = child(TEACH_RECORDED, path, "-f", "-e", f"inject={call}:error=EIO:signal=SIGKILL:when={k}")
            assert killed.returncode != 0, f"{call} {k} of {total}: not killed"
            was_taught = load_bundle(path).model_id != first
            code = teach.run(args(path, rollback=True))
            captured = capsys.readouterr()
            if not was_taught:
                assert code == 2 and "was not taught" in captured.err, (call, k, captured)
                continue
            assert code == 0, (call, k, captured.err)
            assert load_bundle(path).model_id == first, (call, k)
            if "where a teach cut off between its renames left it" in captured.out:
                found_there += 1
                assert f"the version taught from was at {tmp_path}/.{path.name}.teach-" in captured.out, captured.out
                assert not list(tmp_path.glob(f".{path.name}.teach-*"))
    assert found_there == 1, counts


def test_a_taught_version_the_daemon_refuses_to_reload_is_switched_back_to_the_version_it_runs(tmp_path, capsys):
    """A daemon on an FP16 engine measures each bundle's score shift on a folder the bundle names. Its training
    folder was cleaned up after it started, and an --archive teach names none: the real daemon refuses the reload.
    teach --apply exits 1 with the daemon's reason and switches BUNDLE back to the version the daemon still runs
    (left taught, it is what the next start opens and refuses); the taught version is kept in BUNDLE.versions."""
    import dataclasses
    import shutil

    import cv2

    from calibration import teach
    from daemon_harness import in_process_config
    from engines.bundle import thresholds as thresholds_doc
    from engines.model.build_engine import store_onnxruntime_fp16
    from engines.training.train import Progress, train_bundle
    from inspectd.daemon.service import Daemon
    from inspectd.protocol.control import ControlClient

    data, bundle = tmp_path / "data", tmp_path / "b"
    SyntheticLine(96, 96, seed=3).write_folder(data, 16)
    train_bundle(
        data, bundle, size=(SIZE, SIZE), scorer="memory", memory_size=40, seed=5, holdout=HOLDOUT,
        progress=Progress(enabled=False),
    )  # fmt: skip
    store_onnxruntime_fp16(bundle, log=lambda *_: None)
    original = load_bundle(bundle).model_id
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(data.glob("*.png"))]
    archive_of(tmp_path / "archive", [(image, original) for image in images])
    config = in_process_config(tmp_path, bundle, {"kind": "synthetic", "rate_hz": 5, "width": 96, "height": 96})
    fp16 = dataclasses.replace(config.engine, options={"precision": "fp16", "intra_op_threads": 1})
    daemon = Daemon(dataclasses.replace(config, engine=fp16))
    daemon.start()
    try:
        shutil.rmtree(data)
        endpoint = config.control.endpoint
        code = teach.run(args(bundle, archive=str(tmp_path / "archive"), since="1h", apply=endpoint))
        captured = capsys.readouterr()
        assert code == 1, captured
        assert daemon.stage.state.model_id == original
        assert load_bundle(bundle).model_id == original  # what the next start opens is what runs
        taught = load_bundle(tmp_path / "b.versions" / "v2")
        assert taught.model_id != original and taught.manifest["teach"]["previous_model_id"] == original
        # The document on disk is the one the daemon runs, so its own threshold writes go on with no reload.
        next_version = thresholds_doc.next_version(daemon.stage.state.thresholds).to_dict()
        with ControlClient(endpoint, timeout_s=30) as client:
            reply = client.request({"cmd": "set_thresholds", "thresholds": next_version})
        assert reply["ok"] is True and reply["thresholds_version"] == 2, reply
        assert load_bundle(bundle).thresholds() == daemon.stage.state.thresholds
        err = captured.err.splitlines()
        assert len(err) == 2, captured.err
        assert err[0].startswith(f"inspectd teach: --apply {endpoint}: the daemon refused: "), err
        assert "cannot measure how far the reduced-precision engine's scores are" in err[0], err
        assert err[1] == (
            f"inspectd teach: switched {bundle} back to version 1 with thresholds version 1 as they were, which the "
            "daemon still runs, so its next start does not open the refused one; the taught version 2 "
            f"({taught.model_id}) is kept in {taught.path}"
        )
        assert f"{bundle}: rolled back to version 1 ({original}), thresholds version 1;" in captured.out
        assert f"version 2 ({taught.model_id}) kept in {taught.path}" in captured.out
        assert load_bundle(bundle).thresholds().version == 2
    finally:
        daemon.shutdown()


def test_a_reload_refused_for_a_reason_other_than_the_bundle_leaves_the_taught_version_and_says_how_to_go_back(
    trained, good, tmp_path, capsys
):
    """A daemon that is stopping refuses the reload for no fault of the bundle (its reply has no bundle_refused):
    teach --apply exits 1 and leaves the taught version in place, which the next start opens, with the commands to
    retry and to go back; the one to go back, run once the daemon can reload, puts back the version it runs. The
    stopping state is set directly: SIGTERM's shutdown sets it and closes the control channel a drain later, a window
    no request can be timed into."""
    from calibration import teach

    bundle, original, _ = memory_copy(trained, good, tmp_path)
    daemon = in_process_daemon(tmp_path, bundle)
    try:
        endpoint = daemon.config.control.endpoint
        daemon._stopping.set()
        code = teach.run(args(bundle, good=str(good), apply=endpoint))
        captured = capsys.readouterr()
        taught = load_bundle(bundle)
        assert code == 1 and taught.manifest["bundle_version"] == 2 and taught.model_id != original, captured
        assert daemon.stage.state.model_id == original
        assert captured.err.splitlines() == [
            f"inspectd teach: --apply {endpoint}: the daemon refused: reload: the daemon is stopping",
            f"inspectd teach: {bundle} keeps the taught version 2 ({taught.model_id}): the daemon did not refuse the "
            "bundle itself (its reply has no bundle_refused), so its next start or reload opens it: retry with "
            f"`inspectd ctl --endpoint {endpoint} reload`, or go back with `inspectd teach {bundle} --rollback "
            f"--apply {endpoint}`",
        ]
        daemon._stopping.clear()
        assert teach.run(args(bundle, rollback=True, apply=endpoint)) == 0, capsys.readouterr()
        assert load_bundle(bundle).model_id == original == daemon.stage.state.model_id
        assert load_bundle(bundle).thresholds() == daemon.stage.state.thresholds
    finally:
        daemon.shutdown()


class Stalled:
    """A bundle's manifest as a FIFO, storage that answers only when the test lets it: whoever reads it waits until
    `release` puts the file back and hands that reader its bytes."""

    def __init__(self, bundle: Path, scratch: Path) -> None:
        self.manifest = bundle / MANIFEST
        self.content = self.manifest.read_bytes()
        self.scratch = scratch
        self.fifo = scratch / f"{bundle.name}.fifo"  # a second name to reach it by once manifest.json is a file again
        os.mkfifo(self.fifo)
        os.link(self.fifo, scratch / f"{bundle.name}.slow")
        os.replace(scratch / f"{bundle.name}.slow", self.manifest)
        self.fd: int | None = None

    def read(self, timeout: float = 60) -> None:
        """Once a reader has the FIFO open (it then waits for the bytes)."""
        import errno
        import time

        deadline = time.monotonic() + timeout
        while self.fd is None:
            try:  # succeeds only while a reader has the FIFO open
                self.fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO and time.monotonic() < deadline, f"nothing read {self.manifest}"
                time.sleep(0.02)

    def release(self) -> None:
        if not self.manifest.is_fifo():
            return
        self.read(5)
        assert self.fd is not None
        try:
            (self.scratch / "manifest.tmp").write_bytes(self.content)
            os.replace(self.scratch / "manifest.tmp", self.manifest)  # every later read gets the file
            os.write(self.fd, self.content)
        finally:
            os.close(self.fd)


def test_a_reload_still_under_way_at_the_timeout_is_not_switched_back_and_teach_says_how_to_see_how_it_ends(
    trained, good, tmp_path
):
    """The daemon takes teach's reload but has not ended it at --timeout (here it is busy with a reload whose
    manifest is on storage that answers only when the test lets it, a FIFO): that reload may yet succeed, so teach
    leaves the taught version in place, exits 1, and prints the command that shows how it ended and the one that
    goes back should it fail. (BUNDLE is a copy of the bundle the daemon runs, with the same model, so the daemon's
    own manifest can be the FIFO; teach reads its own through one too, so that its reload comes after the daemon's
    has started.)"""
    import shutil
    import threading

    from inspectd.protocol.control import ControlClient

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    running, bundle = tmp_path / "running", tmp_path / "b"
    shutil.copytree(trained, running)
    shutil.copytree(trained, bundle)
    daemon = in_process_daemon(tmp_path, running)
    endpoint = daemon.config.control.endpoint
    stalled = [Stalled(bundle, tmp_path)]
    replies: list[dict] = []

    def reload() -> None:
        with ControlClient(endpoint, timeout_s=60) as client:
            replies.append(client.request({"cmd": "reload"}))

    busy = threading.Thread(target=reload)
    argv = ["teach", str(bundle), "--good", str(good), "--holdout", str(HOLDOUT), "--by", "tester"]
    teaching = subprocess.Popen(
        [sys.executable, "-m", "inspectd", *argv, "--apply", endpoint, "--timeout", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        stalled[0].read()  # teach, past its status probe, loads BUNDLE
        stalled.append(Stalled(running, tmp_path))
        busy.start()
        stalled[1].read()  # the daemon's reload loads its bundle: the control channel answers nothing until it ends
        stalled[0].release()  # teach goes on: its work, the taught version in place, its reload queued behind
        out, err = teaching.communicate(timeout=120)
        stalled[1].release()
        busy.join(30)
        assert replies and replies[0]["ok"] is True, replies
    finally:
        if teaching.poll() is None:
            teaching.kill()
            teaching.communicate()
        for stall in stalled:
            stall.release()
        daemon.shutdown()
    taught = load_bundle(bundle)
    assert teaching.returncode == 1 and taught.manifest["bundle_version"] == 2, out + err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(
        f"inspectd teach: --apply {endpoint}: control {endpoint}: no reply within 1 s to 'reload', which the daemon "
        "took: it may still be reloading"
    ), lines
    assert lines[1] == (
        f"inspectd teach: the daemon may still be loading the taught model {taught.model_id}: `inspectd ctl "
        f"--endpoint {endpoint} status` answers once the reload has ended, and names the model it runs then; if that "
        f"is not {taught.model_id} (reload_failed in its log), {bundle} still holds the taught version 2, which the "
        f"daemon's next start would open: run `inspectd teach {bundle} --rollback --apply {endpoint}`"
    )


def stand_in(path: Path) -> Path:
    """A bundle that teach reads up to its feature graph, which it lacks (write_bundle with a stand-in graph)."""
    from engines.bundle import thresholds as T
    from engines.bundle.store import write_bundle
    from engines.model.recipes import Recipe

    manifest = {
        "method": "frozen",
        "backbone": "lite0",
        "input": {"height": 32, "width": 32, "channels": 1, "resize": "stretch"},
        "scorer_inputs": ["memory_bank"],
        "architecture": {"scorer": "memory"},
        "recipe": Recipe(name="t", scorer="memory", memory_size=8, size=(32, 32), aggregation=15).to_json(),
    }
    scorer = {"memory_bank": np.zeros((4, 2), np.float32)}
    return write_bundle(
        path, manifest, b"stand-in graph", scorer, {"w": np.zeros(2, np.float32)}, T.first_version(1.0, 0.5, {})
    )


def test_frames_that_do_not_decode_are_skipped_and_named_not_the_end_of_the_teach(tmp_path):
    """One frame cut short by a copy once ended `teach --good` with exit 2 before anything was fitted: now it is left
    out with a WARNING naming it, and the teach goes on (here to the stand-in bundle's missing feature graph). Where
    no frame decodes, the first one's error is still the refusal."""
    import cv2

    from station_model import good_frame

    bundle = stand_in(tmp_path / "b")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(8):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    data = (good / "005.png").read_bytes()
    (good / "005.png").write_bytes(data[:40])
    (good / "002.png").write_bytes(b"")
    out = inspectd("teach", str(bundle), "--good", str(good))
    assert out.returncode == 2
    assert out.stdout.splitlines() == [
        f"WARNING: skipped 2 image(s) that do not decode: {good / '002.png'}, {good / '005.png'}"
    ], out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith(f"inspectd teach: bundle {bundle} has no features output")

    for path in good.iterdir():
        path.write_bytes(b"")
    out = inspectd("teach", str(bundle), "--good", str(good))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        f"inspectd teach: {good / '000.png'}: empty file, expected an encoded image (JPEG, PNG, ...)"
    ), out.stderr


def test_frames_that_repeat_an_earlier_frames_bytes_are_left_out_as_train_leaves_them_out(tmp_path):
    """A held-out frame's twin in the fit scores it about 0 and drags the threshold down (a stuck camera exports one
    frame under many ids); train leaves such files out, so teach on train's own folder must list it as train did."""
    import cv2

    from station_model import good_frame

    bundle = stand_in(tmp_path / "b")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(8):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    for i in range(3):
        (good / f"{i + 100:03d}.png").write_bytes((good / f"{i:03d}.png").read_bytes())
    out = inspectd("teach", str(bundle), "--good", str(good))
    assert out.stdout.splitlines()[0] == (
        "note: 3 duplicate image(s) left out: 100.png (same as 000.png), 101.png (same as 001.png), "
        "102.png (same as 002.png)"
    ), out.stdout
    from calibration.teach import folder_frames

    frames = folder_frames(good)
    assert len(frames.paths) == 8 and frames.record["n_duplicates"] == 3


def test_an_archive_teach_leaves_out_a_stuck_cameras_copies_of_one_frame_as_an_export_teach_does(tmp_path):
    from calibration.teach import archive_frames
    from station_model import good_frame

    ids = archive_of(tmp_path / "archive", [(good_frame(i % 3), "m") for i in range(9)])
    frames = archive_frames(tmp_path / "archive", since="1h")
    assert len(frames.paths) == 3 and frames.record["n_duplicates"] == 6, frames.record
    assert frames.record["ids"] == ids[:3] and len(frames.duplicates) == 6


def test_frames_left_out_as_undecodable_are_recorded_as_archive_teach_records_its_unreadable_ones(tmp_path):
    """The teach record's frames.unreadable: an archive's by id (with its ids kept in step with its paths), a
    folder's by file name."""
    import cv2

    from calibration import teach
    from station_model import good_frame

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i:06d}.png")
        cv2.imwrite(str(paths[-1]), good_frame(i))
    paths[1].write_bytes(paths[1].read_bytes()[:40])
    images, decoded, failures = teach.fit_decodable(paths, load_bundle(stand_in(tmp_path / "b")))
    assert decoded == [paths[0], paths[2], paths[3]] and images.shape == (3, 32, 32, 1)
    assert [path for path, _ in failures] == [paths[1]]
    skipped = [paths[1]]
    archived = teach.GoodFrames(paths, "--archive A", {"ids": ["a", "b", "c", "d"], "unreadable": ["z"]}, {})
    kept = teach.without_unreadable(archived, decoded, skipped)
    assert kept.paths == decoded and kept.record == {"ids": ["a", "c", "d"], "unreadable": ["z", "b"]}
    folder = teach.GoodFrames(paths, "--good G", {"folder": "G"}, {})
    assert teach.without_unreadable(folder, decoded, skipped).record == {"folder": "G", "unreadable": ["000001.png"]}


def test_a_good_folder_whose_frames_sit_a_level_down_names_them_as_train_does(tmp_path):
    """Once a bare "0 good frame(s)" where train names the sub-folders that hold the images."""
    import cv2

    from calibration.teach import TeachError, teach
    from station_model import good_frame

    bundle = stand_in(tmp_path / "b")
    nested = tmp_path / "nested"
    for day, n in (("day1", 3), ("day2", 2)):
        (nested / day).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(nested / day / f"{i:03d}.png"), good_frame(i))
    with pytest.raises(TeachError) as refused:
        teach(bundle, nested, out=io.StringIO())
    assert str(refused.value) == (
        f"--good {nested}: 0 good frame(s), expected at least 2 (some fit, some are held out); found 3 images in "
        "day1/: point --good at it; found 2 images in day2/: point --good at it"
    )


def test_frames_in_sub_folders_beside_loose_ones_are_noted_as_left_out(tmp_path):
    """Train, eval and calibrate say so; teach taught on the loose frames alone without a word."""
    import cv2

    from calibration.teach import folder_frames
    from station_model import good_frame

    good = tmp_path / "good"
    (good / "day2").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    for i in range(4):
        cv2.imwrite(str(good / "day2" / f"{i:03d}.png"), good_frame(10 + i))
    frames = folder_frames(good)
    assert len(frames.paths) == 3
    assert list(frames.notes) == [
        f"note: 4 images in sub-folders of {good} left out, only the images directly in it are taught on: day2/ (4); "
        "move them up into it to teach on them"
    ]


def test_an_archive_teach_warns_when_the_span_holds_many_rejects_near_the_threshold(trained, good, tmp_path):
    """`teach --archive` learns only the frames the current model let pass: where it also rejected many in the span
    that could be good parts (the false rejects teach is meant for: scored above the threshold by no more than the
    good frames' own spread above their median), a WARNING counts them, of the same models and camera only (the
    archive keeps every reject), says the rule, and how to review them and teach with --good; the record keeps both
    counts. A reject far above the threshold (a true defect) is not counted: it tripped the warning on every line."""
    bundle, original, images = memory_copy(trained, good, tmp_path)
    # cam0 the even frames, cam1 the odd; rejects: 2 (near) and 4 (far) on cam0, 1 (near) on cam1 by this model, 3
    # (near) on cam1 by another. The good frames score 30-34 (median 31.5: a spread of 2.5) against threshold 35.
    owners = [original] * 3 + ["m-a"] + [original] * 12
    scores = {seq: 30.0 + seq % 5 for seq in range(16)} | {1: 36.0, 2: 36.0, 3: 36.0, 4: 90.0}
    archive = tmp_path / "archive"
    archive_of(
        archive, list(zip(images, owners, strict=True)), defects=(1, 2, 3, 4), cameras=("cam0", "cam1"), scores=scores
    )

    done = inspectd("teach", str(bundle), "--archive", str(archive), "--since", "1h", "--holdout", "0.25")
    assert done.returncode == 0, done.stderr
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["n"] == 12 and frames["rejected"] == {"cam0": 2, "cam1": 1}, frames
    assert frames["rejected_near"] == {"cam0": 1, "cam1": 1}, frames
    assert frames["near_above"] == {"cam0": 2.5, "cam1": 2.5}, frames
    source = f"--archive {archive} --since 1h"
    assert (
        f"WARNING: {source}: the span also holds 2 frame(s) the same model(s) rejected (1 of cam0, 1 of cam1) that "
        "scored less than 2.5 above their threshold (their camera's good frames' own spread: the highest score minus "
        "the median) or no higher than a good frame of the span (3 rejected in all), beside the 12 good frame(s) "
        "taught on"
    ) in done.stdout, done.stdout
    assert (
        f"Review them: `inspectd archive export DIR {source} --verdict ok --split train`, the same with `--verdict "
        "defect --add`, move the good ones into DIR/train/good, and teach with --good DIR"
    ) in done.stdout, done.stdout

    # One camera: only its own rejects count.
    done = inspectd("teach", str(bundle), "--archive", str(archive), "--since", "1h", "--camera", "cam1")
    assert done.returncode == 0, done.stderr
    frames = load_bundle(bundle).manifest["teach"]["frames"]
    assert frames["rejected"] == {"cam1": 1} and frames["rejected_near"] == {"cam1": 1}, frames
    assert (
        "the span also holds 1 frame(s) the same model(s) rejected that scored less than 2.5 above their threshold"
    ) in done.stdout, done.stdout


def test_rejects_far_above_the_threshold_give_no_warning(trained, good, tmp_path):
    """True defects score far above the threshold: however many the span holds, they are not good parts the refit
    misses, and no WARNING counts them (with the default archive.good_every they alone tripped it on any line)."""
    from calibration import teach

    bundle, original, images = memory_copy(trained, good, tmp_path)
    archive = tmp_path / "archive"
    defects = (1, 3, 5, 7)
    scores = {seq: 30.0 + seq % 5 for seq in range(16)} | {seq: 90.0 for seq in defects}
    archive_of(archive, [(image, original) for image in images], defects=defects, scores=scores)
    frames = teach.archive_frames(archive, "1h", models=[original])
    assert len(frames.paths) == 12
    assert teach.rejects_warning(frames) is None
    assert frames.record["rejected"] == {"cam0": 4} and frames.record["rejected_near"] == {}, frames.record


def test_rejects_as_low_as_the_good_frames_count_after_a_threshold_lowered_and_each_camera_has_its_own_spread(
    trained, good, tmp_path
):
    """A threshold lowered inside the span rejects parts that score like the good frames it let pass before, yet well
    above the new threshold plus the good frames' spread: they are counted as rejects that could be good parts. And
    each camera's rejects are judged by its own good frames' spread: a camera scoring on a wide scale does not make
    another camera's true defects look near."""
    from calibration import teach

    _, original, images = memory_copy(trained, good, tmp_path)
    # cam0 alone: good frames score 30-34 against 35; then the threshold is lowered to 25, and four parts scoring
    # 31-34 are rejected: 6 or more above it, against a spread of 2.5.
    scores = {seq: 30.0 + seq % 5 for seq in range(16)}
    lowered = {seq: 25.0 for seq in range(12, 16)}
    archive_of(
        tmp_path / "a", [(image, original) for image in images], (12, 13, 14, 15), scores=scores, thresholds=lowered
    )
    frames = teach.archive_frames(tmp_path / "a", "1h", models=[original])
    assert frames.record["rejected"] == {"cam0": 4} and frames.record["rejected_near"] == {"cam0": 4}, frames.record
    assert "the span also holds 4 frame(s) the same model(s) rejected that scored less than 2.5 above" in (
        teach.rejects_warning(frames) or ""
    )
    # Two cameras: cam0's good frames score 30-32 (a spread of 1.5), cam1's 0-34 around a median of 3.5 (a spread of
    # 30.5).
    # cam0's rejects at 45 and 60 are far above its threshold for cam0, whatever cam1's scale.
    scores = {seq: 30.0 + (seq // 2) % 3 for seq in range(0, 16, 2)} | {seq: float(seq // 2) for seq in range(1, 16, 2)}
    scores |= {15: 34.0, 2: 45.0, 4: 60.0}
    archive_of(tmp_path / "b", [(image, original) for image in images], (2, 4), cameras=("cam0", "cam1"), scores=scores)
    frames = teach.archive_frames(tmp_path / "b", "1h", models=[original])
    assert frames.record["rejected"] == {"cam0": 2} and frames.record["rejected_near"] == {}, frames.record
    assert frames.record["near_above"] == {"cam0": 1.5, "cam1": 30.5}, frames.record


def test_rejects_too_few_to_move_the_threshold_give_no_warning():
    from calibration import teach

    paths = [Path(f"{i:03d}.png") for i in range(40)]
    frames = teach.GoodFrames(paths, "--archive A --since 1h", {"ids": [], "rejected": {"cam0": 1}}, {})
    assert teach.rejects_warning(frames) is None
    frames = teach.GoodFrames(paths, "--archive A --since 1h", {"ids": [], "rejected": {"cam0": 2}}, {})
    assert (teach.rejects_warning(frames) or "").startswith("WARNING: --archive A --since 1h: the span also holds 2")
    # Only the near ones count.
    record = {"ids": [], "rejected": {"cam0": 9}, "rejected_near": {"cam0": 1}, "near_above": {"cam0": 2.0}}
    assert teach.rejects_warning(teach.GoodFrames(paths, "--archive A --since 1h", record, {})) is None
    assert teach.rejects_warning(teach.GoodFrames(paths, "--good G", {"folder": "G"}, {})) is None
    # A camera with no scored good frame in the span: all its rejects count, and the rule says so rather than
    # claiming they scored near the threshold.
    record = {"ids": [], "rejected": {"cam0": 2, "cam1": 3}, "rejected_near": {"cam0": 1, "cam1": 3}}
    said = teach.rejects_warning(
        teach.GoodFrames(paths, "--archive A --since 1h", record | {"near_above": {"cam0": 2.0}}, {})
    )
    assert (
        "the span also holds 4 frame(s) the same model(s) rejected (3 of cam1, 1 of cam0) that scored less than 2 "
        "above their threshold (their camera's good frames' own spread: the highest score minus the median) or no "
        "higher than a good frame of the span, and every one of cam1, which has no scored good frame in the span (5 "
        "rejected in all)"
    ) in (said or ""), said


def shared_stand_in(open_tmp_path: Path) -> tuple[Path, Path, Path]:
    """(a folder, a stand-in bundle in it, a folder of 4 good frames beside it), for tests that teach as nobody."""
    import cv2

    from station_model import good_frame

    if os.geteuid() != 0:
        pytest.skip("needs root, to give the files to nobody")
    shared = open_tmp_path / "shared"
    shared.mkdir()
    bundle = stand_in(shared / "b")
    good = shared / "good"
    good.mkdir()
    for i in range(4):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    return shared, bundle, good


def nobodys(path: Path) -> None:
    for parent, folders, files in os.walk(path):
        for name in [*folders, *files]:
            os.chown(os.path.join(parent, name), 65534, 65534)
    os.chown(path, 65534, 65534)


def as_nobody_teach(*argv: str) -> subprocess.CompletedProcess:
    from other_user import as_nobody

    return subprocess.run(
        as_nobody([sys.executable, "-m", "inspectd", "teach", *argv]),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "USER": "nobody", "LOGNAME": "nobody"},
    )


def test_a_bundle_directory_teach_cannot_write_is_refused_in_one_line_before_any_frame_is_read(open_tmp_path):
    """In place, the version replaced moves from BUNDLE's folder into BUNDLE.versions, which needs BUNDLE itself
    writable: a 0555 bundle in a folder teach may write was found out only after the whole teach, as a raw errno
    naming the staging copy. Now one line naming BUNDLE, before any frame is read, and nothing written."""
    shared, bundle, good = shared_stand_in(open_tmp_path)
    nobodys(shared)
    bundle.chmod(0o555)
    done = as_nobody_teach(str(bundle), "--good", str(good))
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    line = done.stderr.strip()
    assert "\n" not in line, line
    assert line.startswith(f"inspectd teach: {bundle}: not writable by user nobody (Permission denied)"), line
    assert line.endswith(f"(the version it replaces moves from there into {shared / 'b.versions'})"), line
    assert sorted(p.name for p in shared.iterdir()) == ["b", "good"]


def test_a_frame_teach_cannot_read_is_named_with_the_reason_not_as_one_that_does_not_decode(open_tmp_path):
    """A frame this user may not read (another user's 0600 file) is left out as one that does not decode is, but
    its WARNING says it cannot be read and why: "do not decode" sent the operator to look at a sound image."""
    shared, bundle, good = shared_stand_in(open_tmp_path)
    (good / "004.png").write_bytes(b"not a png")
    nobodys(shared)
    os.chown(good / "001.png", 0, 0)
    (good / "001.png").chmod(0o600)
    done = as_nobody_teach(str(bundle), "--good", str(good))
    assert done.stdout.splitlines() == [
        f"WARNING: skipped 1 image(s) that do not decode: {good / '004.png'}",
        f"WARNING: skipped 1 image(s) that cannot be read: {good / '001.png'} (Permission denied)",
    ], done.stdout + done.stderr
    # Then on to the stand-in's missing feature graph.
    assert done.stderr.strip().splitlines()[-1].startswith(f"inspectd teach: bundle {bundle} has no features output")


# `inspectd teach BUNDLE --good DIR` whose switch is stopped by a real SIGINT the moment its last rename returns (the
# move of the version replaced into BUNDLE.versions; where the kernel cannot exchange, the move of the taught version
# to BUNDLE): os.kill to itself, so the interrupt lands there every time, whatever else renames before it.
TEACH_STOPPED_AT_SWITCH = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a test run in the background ignores it
from calibration import teach
from inspectd.cli import main

swap_in, rename = teach.swap_in, os.replace

def stopped(path, incoming, keep, *rest, **kw):
    def replace(src, dst, *a, **k):
        rename(src, dst, *a, **k)
        if os.fspath(src) == os.fspath(incoming) and os.fspath(dst) in (os.fspath(keep), os.fspath(path)):
            os.kill(os.getpid(), signal.SIGINT)
    os.replace = replace
    try:
        swap_in(path, incoming, keep, *rest, **kw)
    finally:
        os.replace = rename

teach.swap_in = stopped
sys.exit(main(["teach", sys.argv[1], "--good", sys.argv[2], "--holdout", "0.25"]))
"""

# The same teach, with a real SIGINT sent while Python unloads its modules at exit, after it put back the default
# action of the signals it handled: from an object's finaliser, which runs then.
TEACH_STOPPED_AT_EXIT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a test run in the background ignores it
from inspectd.cli import main

class Late:
    def __del__(self, kill=os.kill, pid=os.getpid(), sigint=signal.SIGINT):
        kill(pid, sigint)

late = Late()
sys.exit(main(["teach", sys.argv[1], "--good", sys.argv[2], "--holdout", "0.25"]))
"""


def test_a_teach_interrupted_after_its_switch_says_the_taught_version_is_in_place_and_how_to_go_back(
    trained, good, tmp_path
):
    """Ctrl-C right after the switch (a real SIGINT, at the last rename, the move of the version replaced into
    BUNDLE.versions) once printed only "interrupted" while BUNDLE held the taught version, which the daemon's next
    start opens (and the swap's undo ran for a move that had gone through). Now one line says so and how to go
    back, before the exit by the signal, and --rollback does go back."""
    from calibration import teach

    bundle, original, _ = memory_copy(trained, good, tmp_path)
    stopped = subprocess.run(
        [sys.executable, "-c", TEACH_STOPPED_AT_SWITCH, str(bundle), str(good)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    taught = load_bundle(bundle)
    assert taught.manifest["bundle_version"] == 2 and taught.model_id != original
    lines = stopped.stderr.strip().splitlines()
    assert lines[-1].startswith("inspectd teach: interrupted"), stopped.stderr
    assert lines[-2] == (
        f"inspectd teach: stopped after the switch: {bundle} holds the taught version 2 ({taught.model_id}), which "
        f"the daemon's next start or reload opens; the version taught from is {tmp_path / 'b.versions' / 'v1'}: "
        f"`inspectd teach {bundle} --rollback` puts it back"
    ), stopped.stderr
    assert teach.run(args(bundle, rollback=True)) == 0
    assert load_bundle(bundle).model_id == original


def test_a_signal_after_the_teach_and_its_report_leaves_its_exit_status(trained, good, tmp_path):
    """Ctrl-C while Python unloads its modules at exit, after the report: Python has put back the signal's default
    action by then, and the teach ended by the signal (-2, 130 in a shell) with no line while BUNDLE held the taught
    version, so `teach ... && systemctl reload` did not reload. Now the signal is ignored then: exit 0."""
    bundle, original, _ = memory_copy(trained, good, tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", TEACH_STOPPED_AT_EXIT, str(bundle), str(good)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    taught = load_bundle(bundle)
    assert taught.manifest["bundle_version"] == 2 and taught.model_id != original
    assert done.stdout.startswith(f"{bundle}: version 2 ({taught.model_id})"), done.stdout


@pytest.mark.parametrize("source", ["archive", "export"])
def test_an_archive_teach_records_each_cameras_own_drift_reference(trained, good, tmp_path, source):
    """Two cameras on one line, one under dimmer light: a reference pooled over both puts each camera's brightness
    about half in the other's mode, and the drift alarm rose on the unchanged line. Taught from the archive, which
    knows each frame's camera, each camera gets its own reference, and its drift monitor reads it; so taught with
    --good on an export of it, whose archive.jsonl names each frame's camera (it recorded none)."""
    from engines.bundle import thresholds as thresholds_doc
    from inspectd.daemon.drift import monitor_for

    bundle, original, images = memory_copy(trained, good, tmp_path)
    frames = []
    for image in images:  # cam0 the frames as they are, cam1 the same parts at 0.7x the light
        frames += [(image, original), ((image * 0.7).astype(np.uint8), original)]
    archive = tmp_path / "archive"
    archive_of(archive, frames, cameras=("cam0", "cam1"))
    frames_from = ["--archive", str(archive), "--since", "1h"]
    if source == "export":
        frames_from = ["--good", str(export_of(archive, tmp_path / "export"))]

    done = inspectd("teach", str(bundle), *frames_from, "--holdout", "0.6")
    assert done.returncode == 0, done.stderr
    thresholds = load_bundle(bundle).thresholds()
    references = thresholds.provenance[thresholds_doc.PER_CAMERA_REFERENCE]
    assert sorted(references) == ["cam0", "cam1"], done.stdout
    own = {
        camera: thresholds_doc.reference_scores(thresholds, thresholds_doc.GOOD_BRIGHTNESS, camera)[1]
        for camera in ("cam0", "cam1")
    }
    assert np.median(own["cam1"]) < 0.8 * np.median(own["cam0"]), own
    for camera in ("cam0", "cam1"):
        assert np.array_equal(monitor_for(thresholds, camera).brightness.reference, own[camera])
    pooled = thresholds_doc.reference_scores(thresholds, thresholds_doc.GOOD_BRIGHTNESS)[1]
    assert not np.array_equal(pooled, own["cam0"]) and not np.array_equal(pooled, own["cam1"])


# `inspectd teach BUNDLE --rollback` (argv[1]) stopped by a real SIGINT at a point of its switch (argv[2]): "link",
# the moment switch_link's rename returns, in its fsync of the link's folder; "load", as it reads the bundle put back
# after the switch (the whole bundle hashed: the longest step between the switch and its line). "kill-before" and
# "stop-before" stop a teach --good DIR (argv[3]) of a linked BUNDLE just before its link switches, after its new
# version was named: by SIGKILL, by SIGINT.
STOPPED_IN_ROLLBACK = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a test run in the background ignores it
from pathlib import Path
from calibration import teach
from engines.bundle.store import manifest_of
from inspectd.cli import main

bundle, where = Path(sys.argv[1]), sys.argv[2]
switch_link, load_bundle, rename = teach.switch_link, teach.load_bundle, os.replace

def link(at, new_dir):
    if where in ("kill-before", "stop-before"):
        os.kill(os.getpid(), signal.SIGKILL if where == "kill-before" else signal.SIGINT)
    def replace(src, dst, *a, **k):
        rename(src, dst, *a, **k)
        if os.fspath(dst) == os.fspath(at):
            os.kill(os.getpid(), signal.SIGINT)
    os.replace = replace
    try:
        switch_link(at, new_dir)
    finally:
        os.replace = rename

def load(path, *a, **k):
    if Path(path) == bundle and (manifest_of(bundle) or {}).get("bundle_version", 1) == 1:
        print("SIGINT", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGINT)  # the version taught from is back
    return load_bundle(path, *a, **k)

if where == "load":
    teach.load_bundle = load
else:
    teach.switch_link = link
if where.endswith("-before"):
    sys.exit(main(["teach", str(bundle), "--good", sys.argv[3], "--holdout", "0.25"]))
sys.exit(main(["teach", str(bundle), "--rollback"]))
"""


def stopped_in(where: str, bundle: Path, *rest: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", STOPPED_IN_ROLLBACK, str(bundle), where, *rest],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_a_rollback_stopped_within_its_switch_says_it_took_effect_and_to_reload_not_to_roll_back_again(
    trained, good, tmp_path
):
    """Ctrl-C as the link switches back (after the rename, in its fsync) once printed only "interrupted" while the
    link already pointed to the version taught from: the natural retry rolled back one version more, or was refused
    where that one was not taught. Now one line says BUNDLE holds the version put back and that the daemon needs a
    reload, not a second rollback."""
    import shutil

    from calibration.teach import teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(trained, bundles / "b1")
    (bundles / "current").symlink_to("b1")
    original = load_bundle(bundles / "b1")
    taught = teach(bundles / "current", good, holdout=HOLDOUT, by="tester", out=io.StringIO())

    stopped = stopped_in("link", bundles / "current")
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert os.readlink(bundles / "current") == "b1"
    lines = stopped.stderr.strip().splitlines()
    assert lines[-1].startswith("inspectd teach: interrupted"), stopped.stderr
    assert lines[-2] == (
        f"inspectd teach: stopped after the rollback: {bundles / 'current'} holds version 1 ({original.model_id}) "
        f"again, the one version 2 ({taught.model_id}) was taught from, which the daemon's next start or reload "
        "opens: reload it (`inspectd ctl reload`); --rollback again would go back one version more"
    ), stopped.stderr


def test_a_rollback_stopped_after_its_switch_finishes_and_says_what_it_put_back(trained, good, tmp_path):
    """Ctrl-C while the rollback reads the bundle it put back (a directory BUNDLE, swapped in place): once
    "interrupted" with BUNDLE already back on the version taught from. Stop signals are held off from the switch
    to the line that says so, as at exit: the rollback ends with its line and exit 0."""
    from calibration.teach import teach

    bundle, original, _ = memory_copy(trained, good, tmp_path)
    teach(bundle, good, holdout=HOLDOUT, by="tester", out=io.StringIO())

    done = stopped_in("load", bundle)
    assert done.returncode == 0 and done.stderr == "SIGINT\n", done.stdout + done.stderr
    back = load_bundle(bundle)
    assert back.model_id == original and back.manifest.get("bundle_version", 1) == 1
    assert done.stdout.startswith(f"{bundle}: rolled back to version 1 ({original})"), done.stdout + done.stderr


def test_a_linked_teach_stopped_before_its_switch_leaves_no_version_beside(trained, good, tmp_path):
    """Ctrl-C between naming the new version (b1-v2) and switching the link to it: the link stays, and the named
    version, a full bundle no daemon ever ran under a name like a version in service, once stayed for good."""
    import shutil

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(trained, bundles / "b1")
    (bundles / "current").symlink_to("b1")

    stopped = stopped_in("stop-before", bundles / "current", str(good))
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == "inspectd teach: interrupted", stopped.stderr
    assert os.readlink(bundles / "current") == "b1"
    assert sorted(p.name for p in bundles.iterdir()) == ["b1", "current"]


def test_a_teach_whose_pixel_threshold_lands_above_its_image_threshold_says_defects_may_have_no_region(
    trained, good, tmp_path
):
    """Teach sets both thresholds, as train does: where the pixel one lands above the image one (a pooled image score
    is at most its map's maximum), a frame scored between them is a defect with no region, and teach says so as
    train and calibrate do. Thresholds the other way round are not warned of."""
    import shutil

    from calibration import teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    for name, false_reject, pixel_fpr, warned in (("high", 0.5, 1e-9, True), ("low", 1e-3, 0.5, False)):
        bundle = tmp_path / name
        shutil.copytree(trained, bundle)
        out = io.StringIO()
        taught = teach.teach(
            bundle, good, holdout=HOLDOUT, by="tester", target_false_reject=false_reject, pixel_fpr=pixel_fpr, out=out
        )
        image, pixel = taught.thresholds().image_threshold, taught.thresholds().pixel_threshold
        assert (pixel > image) == warned, (image, pixel)
        lines = [line for line in out.getvalue().splitlines() if "can be defects with no region" in line]
        if warned:
            assert lines == [
                f"WARNING: the pixel threshold {pixel:.6g} is above the image threshold {image:.6g}, and an image "
                f"score is at most its map's maximum: frames scored from {image:.6g} to below {pixel:.6g} can be "
                f"defects with no region (an empty mask); a higher --pixel-fpr sets a lower pixel threshold (teach "
                f"again with it, or `inspectd calibrate {bundle} --good DIR --pixel --pixel-fpr RATE`)"
            ], out.getvalue()
        else:
            assert lines == [], out.getvalue()


@pytest.mark.parametrize("by", ["", "  "])
def test_a_blank_by_is_refused_not_taken_for_the_account_teach_runs_as(by, tmp_path, capsys):
    """An unset $OPERATOR in a script gives `--by ""`: taken as no --by, the record named the account teach ran as
    (often root or the service user) as the one who confirmed the frames."""
    from calibration import teach

    assert teach.run(args(tmp_path / "bundle", good=str(tmp_path), by=by)) == 2
    assert capsys.readouterr().err == f"inspectd teach: --by {by!r}: expected who confirmed the frames (a name)\n"
