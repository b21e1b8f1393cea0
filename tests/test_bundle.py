"""Bundles on disk: a real trained bundle loads; every kind of damage is refused with one BundleError line naming the
file; thresholds are replaced atomically with their checksum; nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.store import load_bundle, write_bundle
from engines.errors import BundleError, EngineError
from engines.runtime import open_engine
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real trained bundle, from the built-in synthetic line: the damage tests below run on every machine, with or
    without the shared data set."""
    from engines.data.synthline import SyntheticLine
    from engines.progress import Progress
    from engines.training.train import train_bundle

    root = tmp_path_factory.mktemp("data") / "good"
    SyntheticLine(64, 64, seed=3).write_folder(root, 8)
    out = tmp_path_factory.mktemp("bundles") / "frozen"
    train_bundle(root, out, size=(64, 64), scorer="kmeans", k=2, progress=Progress(enabled=False))
    return out


@pytest.fixture()
def bundle_dir(trained, tmp_path) -> Path:
    """A fresh copy of the trained bundle for a test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "bundle"))


def rewrite_manifest(bundle_dir: Path, change) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    change(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def refusal(bundle_dir: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_trained_bundle_loads_with_its_contract(trained):
    bundle = load_bundle(trained)
    assert re.fullmatch(r"frozen-lite0-[0-9a-f]{8}", bundle.model_id)
    assert (bundle.method, bundle.backbone, bundle.input_shape, bundle.resize_policy) == (
        "frozen",
        "lite0",
        (64, 64, 1),
        "stretch",
    )
    assert bundle.graph_path == trained / "model.onnx" and bundle.graph_path.is_file()
    assert bundle.scorer_inputs == ("references",)
    references = bundle.scorer_params()["references"]
    assert references.dtype == np.float32 and references.ndim == 4 and 1 <= references.shape[0] <= 2
    assert "backbone.features.conv_stem.weight" in bundle.weights()
    thresholds = bundle.thresholds()
    assert thresholds.version == 1 and thresholds.image_threshold > 0 and thresholds.pixel_threshold > 0
    assert thresholds.provenance["n_fit"] + thresholds.provenance["n_holdout"] == 8
    assert bundle.manifest["interrupted"] is False
    # 8-bit training images declare no depth: 16-bit frames are narrowed as 16-bit, as before depths were recorded.
    assert "bit_depth" not in bundle.manifest["input"]
    assert bundle.declared_bit_depth is None and bundle.bit_depth == 16


def test_a_declared_bit_depth_reads_back(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: m["input"].__setitem__("bit_depth", 12))
    assert load_bundle(bundle_dir).declared_bit_depth == 12 == load_bundle(bundle_dir).bit_depth


def test_missing_file_is_refused(bundle_dir):
    (bundle_dir / "scorer.npz").unlink()
    message = refusal(bundle_dir)
    assert "scorer.npz" in message and "missing" in message


def test_file_missing_from_the_manifest_is_refused(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: m["files"].pop("weights.npz"))
    assert "weights.npz" in refusal(bundle_dir)


def test_tampered_file_is_refused(bundle_dir):
    data = bytearray((bundle_dir / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_dir / "weights.npz").write_bytes(bytes(data))
    message = refusal(bundle_dir)
    assert "weights.npz" in message and "does not match" in message


def test_thresholds_edited_by_hand_are_refused(bundle_dir):
    doc = json.loads((bundle_dir / "thresholds.json").read_text())
    doc["image_threshold"] = 1e9
    (bundle_dir / "thresholds.json").write_text(json.dumps(doc))
    assert "thresholds.json" in refusal(bundle_dir)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_manifest_paths_escaping_the_directory_are_refused(bundle_dir, name):
    outside = bundle_dir.parent / "outside.bin"
    outside.write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    rewrite_manifest(bundle_dir, lambda m: m["files"].__setitem__(name, digest))
    message = refusal(bundle_dir)
    assert name in message and "escapes" in message


def test_symlinked_file_is_refused_even_with_the_right_checksum(bundle_dir, tmp_path):
    real = tmp_path / "elsewhere.json"
    shutil.copy(bundle_dir / "thresholds.json", real)
    (bundle_dir / "thresholds.json").unlink()
    (bundle_dir / "thresholds.json").symlink_to(real)
    message = refusal(bundle_dir)
    assert "thresholds.json" in message and "symlink" in message


def test_unknown_format_version_is_refused(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: m.__setitem__("format_version", 2))
    message = refusal(bundle_dir)
    assert "format_version 2" in message and "expected 1 (a bundle written by a newer inspectd" in message
    rewrite_manifest(bundle_dir, lambda m: m.__setitem__("format_version", True))  # True == 1 in Python
    assert refusal(bundle_dir).endswith("format_version True, expected 1")


def test_not_a_bundle_is_refused(tmp_path):
    assert "not a directory" in refusal(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    assert "manifest.json" in refusal(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    assert "not valid JSON" in refusal(tmp_path / "junk")


def _replace_with_pickled_npz(bundle_dir: Path, name: str, arrays: dict) -> None:
    path = bundle_dir / name
    np.savez(path, **arrays)  # an object array is stored pickled
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite_manifest(bundle_dir, lambda m: m["files"].__setitem__(name, digest))


def test_pickled_scorer_npz_is_refused_at_load(bundle_dir):
    _replace_with_pickled_npz(bundle_dir, "scorer.npz", {"references": np.array([{"evil": "object"}], dtype=object)})
    message = refusal(bundle_dir)
    assert "scorer.npz" in message and "pickled" in message


def test_pickled_weights_npz_is_refused_when_read(bundle_dir):
    _replace_with_pickled_npz(bundle_dir, "weights.npz", {"w": np.array([print], dtype=object)})
    bundle = load_bundle(bundle_dir)  # checksums fine; weights are read only by the torch backend and export
    with pytest.raises(BundleError, match=r"weights.npz: holds pickled objects"):
        bundle.weights()


def test_replace_file_rewrites_thresholds_and_checksum_atomically(bundle_dir):
    bundle = load_bundle(bundle_dir)
    newer = thresholds_doc.next_version(bundle.thresholds(), image_threshold=0.123, provenance={"tool": "test"})
    before = set(p.name for p in bundle_dir.iterdir())
    bundle.replace_file("thresholds.json", thresholds_doc.dumps(newer))
    assert set(p.name for p in bundle_dir.iterdir()) == before  # no temp files left behind
    reloaded = load_bundle(bundle_dir)
    assert reloaded.thresholds().version == 2 and reloaded.thresholds().image_threshold == 0.123
    assert (
        reloaded.manifest["files"]["thresholds.json"]
        == hashlib.sha256((bundle_dir / "thresholds.json").read_bytes()).hexdigest()
    )
    assert reloaded.model_id == bundle.model_id  # thresholds do not change what the model computes
    with pytest.raises(BundleError, match="not listed in the manifest"):
        bundle.replace_file("notes.txt", b"x")
    with pytest.raises(BundleError, match="escapes"):
        bundle.replace_file("../thresholds.json", b"x")


def test_write_bundle_replaces_an_existing_bundle_whole(bundle_dir):
    old = load_bundle(bundle_dir)
    params = {"references": old.scorer_params()["references"][:1] * 2}
    write_bundle(
        bundle_dir,
        {k: old.manifest[k] for k in ("method", "backbone", "input", "scorer_inputs", "architecture")},
        old.graph_path.read_bytes(),
        params,
        old.weights(),
        old.thresholds(),
    )
    new = load_bundle(bundle_dir)
    assert new.model_id != old.model_id and new.model_id.startswith("frozen-lite0-")
    np.testing.assert_array_equal(new.scorer_params()["references"], params["references"])
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(f".{bundle_dir.name}.")]
    with pytest.raises(BundleError, match="scorer params lack references"):
        write_bundle(
            bundle_dir,
            {k: old.manifest[k] for k in ("method", "backbone", "input", "scorer_inputs")},
            b"",
            {},
            {},
            old.thresholds(),
        )


def test_write_bundle_refuses_a_bundle_holding_a_users_files_and_leaves_it_whole(bundle_dir):
    """A README or a notes/ folder put into a bundle went with the old bundle at the swap: every writer (train, teach)
    goes through write_bundle, which names them in one line and writes nothing."""
    old = load_bundle(bundle_dir)
    (bundle_dir / "README.txt").write_text("line 3 model\n")
    (bundle_dir / "notes").mkdir()
    (bundle_dir / "notes" / "n.txt").write_text("n\n")
    fields = {k: old.manifest[k] for k in ("method", "backbone", "input", "scorer_inputs", "architecture")}
    with pytest.raises(BundleError) as info:
        write_bundle(bundle_dir, fields, old.graph_path.read_bytes(), old.scorer_params(), {}, old.thresholds())
    assert str(info.value) == (
        f"{bundle_dir}: an inspectd bundle that also holds 2 entries its manifest does not list (README.txt, notes/), "
        "expected only the bundle's own files: move them out first; not written, it holds what it held before"
    )
    assert (bundle_dir / "notes" / "n.txt").read_text() == "n\n" and load_bundle(bundle_dir).model_id == old.model_id


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("resize", "letterbox", "input.resize 'letterbox', expected one of stretch, pad"),
        ("resize", None, "input.resize None, expected one of stretch, pad"),
        ("channels", 4, "input.channels 4, expected 1 (grey) or 3 (RGB)"),
        ("bit_depth", 17, "input.bit_depth 17, expected an integer 8-16"),
        ("bit_depth", 7, "input.bit_depth 7, expected an integer 8-16"),
        ("bit_depth", 12.0, "input.bit_depth 12.0, expected an integer 8-16"),
        ("bit_depth", None, "input.bit_depth None, expected an integer 8-16"),
        ("bit_depth", "12", "input.bit_depth '12', expected an integer 8-16"),
        ("bit_depth", True, "input.bit_depth True, expected an integer 8-16"),
    ],
)
def test_an_input_the_runtime_cannot_fit_frames_to_is_refused_at_load(bundle_dir, key, value, message):
    """Such a bundle used to load, open its engine and warm up (warm-up feeds the engine directly), then fail every
    frame on the line once it had replaced the running model."""
    rewrite_manifest(bundle_dir, lambda m: m["input"].__setitem__(key, value))
    assert message in refusal(bundle_dir)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("graph", ["model.onnx"], "graph ['model.onnx'], expected a file name"),
        ("scorer_inputs", None, "scorer_inputs None, expected a list of graph input names"),
        ("scorer_inputs", "centre", "scorer_inputs 'centre', expected a list of graph input names"),
        # Read as a mapping by the reduced-precision probe at an fp16 start: an AttributeError traceback there.
        ("training", [], "training [], expected the mapping train recorded"),
        ("training", None, "training None, expected the mapping train recorded"),
    ],
)
def test_manifest_values_of_the_wrong_type_are_refused_in_one_line_naming_the_key(bundle_dir, key, value, message):
    rewrite_manifest(bundle_dir, lambda m: m.__setitem__(key, value))
    assert message in refusal(bundle_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.__setitem__("model_id", 5), "model_id 5, expected a non-empty string"),
        (lambda m: m.__setitem__("model_id", ""), "model_id '', expected a non-empty string"),
        (lambda m: m.__setitem__("method", None), "method None, expected a non-empty string"),
        (lambda m: m.__setitem__("backbone", ["lite0"]), "backbone ['lite0'], expected a non-empty string"),
        (lambda m: m.__setitem__("method", "patchcore"), "method 'patchcore', expected the recorded recipe's 'frozen'"),
        (lambda m: m["input"].__setitem__("resize", "pad"), "input.resize 'pad', expected the recorded recipe's "
         "'stretch'"),
        (lambda m: m.__setitem__("recipe", "kmeans"), "recipe 'kmeans', expected the mapping train recorded"),
        (lambda m: m.__setitem__("model_id", "frozen-lite0"), "model_id 'frozen-lite0', expected 'frozen-lite0-' "
         "and 8 hex digits"),
        (lambda m: (m.pop("recipe"), m.__setitem__("backbone", "resnet")), "model_id 'frozen-lite0-"),
    ],
)  # fmt: skip
def test_hand_edits_of_what_results_are_published_under_or_frames_judged_by_are_refused(bundle_dir, edit, message):
    """The manifest has no checksum. A model_id that is not a string used to load and be published in every result,
    which every subscriber and bridge then refused; an edited resize judged frames otherwise than the thresholds were
    set on, without a word; a model_id no writer gives names no model."""
    rewrite_manifest(bundle_dir, edit)
    assert refusal(bundle_dir).startswith(f"{bundle_dir / 'manifest.json'}: {message}")


@pytest.mark.parametrize(
    "value, dtype",
    [(np.array(["a", "b"]), "<U1"), (np.array([1 + 2j, 3 + 0j], np.complex64), "complex64")],
)
def test_scorer_arrays_that_are_not_real_numbers_are_refused_naming_the_file_and_array(bundle_dir, value, dtype):
    """Text failed in numpy's words naming no file; complex loaded, its imaginary part dropped with only a warning."""
    path = bundle_dir / "scorer.npz"
    with path.open("wb") as out:
        np.savez(out, references=value)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite_manifest(bundle_dir, lambda m: m["files"].__setitem__("scorer.npz", digest))
    assert refusal(bundle_dir) == f"{path}: references has dtype {dtype}, expected real numbers"


def test_onnxruntime_refuses_a_graph_whose_pixels_do_not_fit_the_manifest_input(bundle_dir):
    """The manifest carries no checksum: such a bundle used to open, then fail warm-up and every batch with ONNX
    Runtime's multi-line dimension error."""
    rewrite_manifest(bundle_dir, lambda m: m["input"].__setitem__("height", 48))
    with pytest.raises(EngineError) as info:
        open_engine(load_bundle(bundle_dir), "onnxruntime", {"intra_op_threads": 1})
    assert str(info.value) == (
        f"{bundle_dir / 'model.onnx'}: takes pixels [N, 64, 64, 1], the manifest's input is 48x64x1"
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["input"].__setitem__("height", 48), "its architecture builds a graph for 64x64x1 pixels, "
         "the manifest's input is 48x64x1"),
        (lambda m: m["input"].__setitem__("channels", 3), "its architecture builds a graph for 64x64x1 pixels, "
         "the manifest's input is 64x64x3"),
        # Without the recipe, which load compares the architecture with (below), as a bundle written before it.
        (lambda m: (m.pop("recipe"), m["architecture"].__setitem__("scorer", "gaussian")), "its architecture "
         "builds a graph with scorer inputs"),
    ],
)  # fmt: skip
def test_the_torch_backend_refuses_a_manifest_that_does_not_fit_the_graph_it_rebuilds(bundle_dir, edit, message):
    """What ONNX Runtime refuses at open, the torch backend refused only per batch in torch's words, or ran, placing
    its maps at the manifest's wrong size."""
    rewrite_manifest(bundle_dir, edit)
    with pytest.raises(EngineError) as info:
        open_engine(load_bundle(bundle_dir), "torch", {"threads": 1})
    assert str(info.value).startswith(f"{bundle_dir}: {message}"), str(info.value)


@pytest.mark.parametrize("name", ["scorer.npz", "weights.npz"])
@pytest.mark.parametrize("content", [b"PK\x03\x04 cut short", b"\x93NUMPY", b"member", b"text"])
def test_an_npz_that_is_not_one_is_refused_in_one_line_even_with_its_checksum(bundle_dir, name, content):
    import zipfile

    path = bundle_dir / name
    if content.startswith(b"\x93NUMPY"):  # a single array saved under the .npz name
        with path.open("wb") as out:
            np.save(out, np.zeros(3, np.float32))
    elif content == b"member":  # a whole zip, one member's .npy header damaged
        members = zipfile.ZipFile(path).namelist()
        with zipfile.ZipFile(path, "w") as out:
            for member in members:
                out.writestr(member, b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f4', 'fortran_order': (\n")
    elif content == b"text":
        path.write_text("not an archive\n")
    else:
        path.write_bytes(path.read_bytes()[:200])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite_manifest(bundle_dir, lambda m: m["files"].__setitem__(name, digest))
    with pytest.raises(BundleError) as info:
        bundle = load_bundle(bundle_dir)
        bundle.scorer_params() if name == "scorer.npz" else bundle.weights()
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value), str(info.value)
    assert "holds pickled objects" not in str(info.value), str(info.value)


def set_architecture(field, value):
    return lambda m: m["architecture"].__setitem__(field, value)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("smoothing_sigma", 1.0, "expected the recorded recipe's smoothing_sigma 4.0"),
        ("aggregation", 5, "expected the recorded recipe's aggregation "),
        ("score_share", 0.5, "expected the recorded recipe's score_share 0.0"),
        ("scorer", "gaussian", "expected the recorded recipe's scorer 'kmeans'"),
        ("taps", [1, 2], "(strides [4, 8]), expected the recorded recipe's taps "),
        ("input_shape", [32, 64, 1], "expected the recorded recipe's size [64, 64]"),
        ("method", "trained", "expected the recorded recipe's method 'frozen'"),
        ("backbone", "resnet18", "expected the recorded recipe's backbone 'lite0'"),
    ],
)
def test_an_architecture_edited_away_from_the_recorded_recipe_is_refused(bundle_dir, field, value, expected):
    """The torch backend and export rebuild the graph from the architecture, which has no checksum and which ONNX
    Runtime never reads: such an edit moved the torch backend's (and a re-export's) scores away from ONNX Runtime's
    under the same model_id and thresholds."""
    rewrite_manifest(bundle_dir, set_architecture(field, value))
    message = refusal(bundle_dir)
    assert message.startswith(f"{bundle_dir / 'manifest.json'}: architecture.{field} {value!r}"), message
    assert expected in message, message


def test_an_architecture_lacking_a_field_is_compared_as_the_graph_defaults_it(bundle_dir):
    """No aggregation: a memory scorer's graph aggregates 15x15 (what bundles did before recipes recorded it)."""
    rewrite_manifest(bundle_dir, lambda m: (m["architecture"].pop("aggregation"), m["recipe"].update(scorer="memory"),
                                            m["architecture"].update(scorer="memory")))  # fmt: skip
    assert refusal(bundle_dir) == (
        f"{bundle_dir / 'manifest.json'}: architecture.aggregation 15, expected the recorded recipe's aggregation "
        f"{load_recipe(bundle_dir)['aggregation']}"
    )


def load_recipe(bundle_dir):
    return json.loads((bundle_dir / "manifest.json").read_text())["recipe"]


def test_an_architecture_without_a_recipe_to_compare_with_loads_as_before(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: (m.pop("recipe"), m["architecture"].update(smoothing_sigma=1.0)))
    assert load_bundle(bundle_dir).architecture["smoothing_sigma"] == 1.0


@pytest.mark.parametrize("architecture", [True, False], ids=["architecture", "no-architecture"])
@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("smoothing_sigma", "x", "a number in (0, 64]"),
        ("smoothing_sigma", 0, "a number in (0, 64]"),
        ("smoothing_sigma", 10**400, "a number in (0, 64]"),
        ("score_share", "y", "a share in [0, 1]"),
        ("score_share", 1.5, "a share in [0, 1]"),
        ("k", "x", "an integer >= 1"),
        ("k", 0, "an integer >= 1"),
        ("k", 2.5, "an integer >= 1"),
        ("k", True, "an integer >= 1"),
        ("memory_size", None, "an integer >= 1"),
        ("memory_size", "16384", "an integer >= 1"),
        ("augment", 5, "a non-empty string naming the copies"),
        ("augment", "", "a non-empty string naming the copies"),
        ("name", 7, "a non-empty string"),
        ("description", None, "a string"),
        ("taps", 7, "increasing strides from 2,4,..,32"),
        ("taps", [32, 16], "increasing strides from 2,4,..,32"),
        ("taps", [12], "increasing strides from 2,4,..,32"),
        ("taps", [16, 64], "increasing strides from 2,4,..,32"),
        ("size", 5, "height and width in 32..4096"),
        ("size", [64, "64"], "height and width in 32..4096"),
        ("size", [64, 64, 1], "height and width in 32..4096"),
        ("aggregation", 4, "an odd window >= 1"),
        ("scorer", "", "a non-empty string"),
        ("resize", "crop", "one of stretch, pad"),
        ("method", 3, "a non-empty string"),
        ("backbone", None, "a non-empty string"),
    ],
)
def test_a_hand_edited_recipe_field_is_refused_at_load_naming_the_key(bundle_dir, field, value, expected, architecture):
    """The recipe has no checksum, and only its fields that set the architecture were compared with it: `k: "x"` or
    `smoothing_sigma: "x"` loaded, and with no architecture section any recipe did, until teach's int(), the TensorRT
    profile's row ceilings or eval's report took the value on trust and failed with a traceback."""
    rewrite_manifest(
        bundle_dir, lambda m: (m["recipe"].__setitem__(field, value), architecture or m.pop("architecture"))
    )
    assert refusal(bundle_dir) == f"{bundle_dir / 'manifest.json'}: recipe.{field} {value!r}, expected {expected}"


def test_a_recipe_recorded_before_some_fields_or_after_new_ones_still_loads(bundle_dir):
    """Older trains recorded score_share and augment not yet, and a later one may record more: load asks only that
    those it knows be what they must be."""

    def edit(m):
        for field in ("score_share", "augment"):
            m["recipe"].pop(field)
        m["recipe"]["later_field"] = {"anything": 1}
        m.pop("architecture")

    rewrite_manifest(bundle_dir, edit)
    recipe = load_bundle(bundle_dir).recipe
    assert (recipe["score_share"], recipe["augment"], recipe["later_field"]) == (0.0, "none", {"anything": 1})


@pytest.mark.parametrize("field", ["smoothing_sigma", "scorer", "aggregation", "k", "description"])
def test_a_recipe_field_every_recipe_records_is_refused_when_missing(bundle_dir, field):
    """Every field but score_share and augment has been recorded since recipes were: one missing is a hand edit, and
    loaded, eval scored every image and then failed describing the recipe (a traceback naming no file)."""
    rewrite_manifest(bundle_dir, lambda m: (m["recipe"].pop(field), m.pop("architecture")))
    assert refusal(bundle_dir).startswith(f"{bundle_dir / 'manifest.json'}: recipe.{field} missing, expected ")


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, []])
def test_an_interrupted_flag_that_is_not_a_json_boolean_is_refused(bundle_dir, value):
    """bool() read the string "false" as interrupted."""
    rewrite_manifest(bundle_dir, lambda m: m.__setitem__("interrupted", value))
    assert refusal(bundle_dir) == f"{bundle_dir / 'manifest.json'}: interrupted {value!r}, expected true or false"


@pytest.mark.parametrize("value", [True, False])
def test_an_interrupted_flag_loads_as_recorded(bundle_dir, value):
    rewrite_manifest(bundle_dir, lambda m: m.__setitem__("interrupted", value))
    assert load_bundle(bundle_dir).interrupted is value


@pytest.mark.parametrize("recorded", [True, False], ids=["recipe", "no-recipe"])
@pytest.mark.parametrize(
    "edit, field, expected",
    [
        (lambda m: m.__setitem__("architecture", "x"), "architecture", "the mapping train recorded"),
        (set_architecture("taps", "23"), "architecture.taps", "a list of backbone feature indices"),
        (set_architecture("taps", [2, True]), "architecture.taps", "a list of backbone feature indices"),
        (set_architecture("taps", [2, 7]), "architecture.taps", "a list of backbone feature indices"),
        (set_architecture("input_shape", "64"), "architecture.input_shape", "[height, width, channels]"),
        (set_architecture("head", []), "architecture.head", "a mapping"),
        (set_architecture("scorer", 3), "architecture.scorer", "a non-empty string"),
        (set_architecture("aggregation", 2), "architecture.aggregation", "an odd window"),
        (set_architecture("smoothing_sigma", "4"), "architecture.smoothing_sigma", "a number in (0, 64]"),
        (set_architecture("smoothing_sigma", 0), "architecture.smoothing_sigma", "a number in (0, 64]"),
        (set_architecture("smoothing_sigma", -1), "architecture.smoothing_sigma", "a number in (0, 64]"),
        (set_architecture("score_share", 2), "architecture.score_share", "a share in [0, 1]"),
        # An int too large for a float: math.isfinite raised OverflowError, a traceback from `inspectd run --check`.
        (set_architecture("smoothing_sigma", 10**400), "architecture.smoothing_sigma", "a number in (0, 64]"),
        (set_architecture("smoothing_sigma", 65), "architecture.smoothing_sigma", "a number in (0, 64]"),
        (set_architecture("score_share", 10**400), "architecture.score_share", "a share in [0, 1]"),
        (set_architecture("score_share", -(10**400)), "architecture.score_share", "a share in [0, 1]"),
    ],
)
def test_a_wrong_typed_architecture_is_refused_at_load_in_one_line(bundle_dir, edit, field, expected, recorded):
    """A string architecture, or taps as a string, was a TypeError inside timm at the torch backend's start (a
    traceback from `inspectd run --check`); sigma 0 gave NaN maps. Refused at load, every path gets it."""
    rewrite_manifest(bundle_dir, edit if recorded else lambda m: (m.pop("recipe"), edit(m)))
    message = refusal(bundle_dir)
    assert message.startswith(f"{bundle_dir / 'manifest.json'}: {field} "), message
    assert message.endswith(expected) or f"expected {expected}" in message, message


@pytest.mark.parametrize("recorded", [True, False], ids=["recipe", "no-recipe"])
@pytest.mark.parametrize("field", ["method", "backbone", "scorer", "taps", "input_shape"])
def test_an_architecture_without_a_field_the_graph_needs_is_blamed_on_the_manifest(bundle_dir, field, recorded):
    """The torch backend or a re-export failed on a bare key, blamed on weights.npz. Load does not require the fields:
    a bundle scored by its ONNX graph alone may carry a partial architecture."""
    from engines.model.export import graph_from_bundle

    rewrite_manifest(bundle_dir, lambda m: (m["architecture"].pop(field), recorded or m.pop("recipe")))
    with pytest.raises(BundleError) as refused:
        graph_from_bundle(load_bundle(bundle_dir))
    assert str(refused.value).startswith(f"{bundle_dir / 'manifest.json'}: architecture does not build a graph (")


# The torch backend takes its parameters' shapes from scorer.npz itself: only ONNX Runtime has a shape to refuse.
@pytest.mark.parametrize(
    "backend, damage",
    [("onnxruntime", "shape")] + [(b, d) for b in ("onnxruntime", "torch") for d in ("nan", "inf", "empty")],
)
def test_a_scorer_npz_an_engine_refuses_is_named_by_its_path(bundle_dir, backend, damage):
    """Load checks only its arrays' names and dtype; the engine checks their shapes and values, and its refusal named
    neither the bundle nor the file."""
    path = bundle_dir / "scorer.npz"
    with np.load(path) as npz:
        arrays = {name: npz[name].astype(np.float32) for name in npz.files}
    references = arrays["references"]
    arrays["references"] = {
        "shape": references[..., None],
        "nan": np.where(np.arange(references.size).reshape(references.shape) == 0, np.nan, references),
        "inf": np.full_like(references, np.inf),
        "empty": references[:0],
    }[damage]
    with path.open("wb") as out:
        np.savez(out, **arrays)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite_manifest(bundle_dir, lambda m: m["files"].__setitem__("scorer.npz", digest))
    with pytest.raises(EngineError) as info:
        open_engine(load_bundle(bundle_dir), backend, {})
    message = str(info.value)
    assert message.startswith(f"{path}: references "), message
    assert "\n" not in message


def test_a_missing_architecture_is_blamed_on_the_manifest_not_the_weights(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: m.pop("architecture"))
    bundle = load_bundle(bundle_dir)  # only the torch backend, export and teach need it
    with pytest.raises(BundleError) as info:
        open_engine(bundle, "torch")
    message = str(info.value)
    assert message.startswith(f"{bundle_dir / 'manifest.json'}: key 'architecture' missing")
    assert "weights.npz" not in message and "\n" not in message
