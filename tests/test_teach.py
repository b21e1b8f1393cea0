"""`inspectd teach`: the scorer refitted on the station (ONNX Runtime features, numpy fit) matches `inspectd train`'s
fit of the same recipe on the same frames, for every scorer; the new version keeps the graph and carries provenance,
recalibrated thresholds and the comparison; rollback puts the previous version back; a bundle without the feature
graph gets one line."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest

from engines.bundle.format import FEATURE_GRAPH, GRAPH, MANIFEST, WEIGHTS
from engines.bundle.store import load_bundle
from engines.data.synthline import SyntheticLine
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
SIZE = 64
HOLDOUT = 0.25


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

    restored = rollback(bundles / "current", out=io.StringIO())
    assert os.readlink(bundles / "current") == "frozen-a" and restored.model_id == before.model_id
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
