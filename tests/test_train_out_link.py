"""`inspectd train --out` naming the `current` link of the installed layout (bundles/current -> bundles/<name>)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from engines.bundle.store import load_bundle, write_bundle
from engines.errors import BundleError
from engines.training.train import add_arguments, run
from station_model import write_grey_bundle
from tiny_dataset import make_tiny_mvtec


def test_a_bundle_path_that_is_a_link_is_refused_and_the_link_and_its_bundle_are_kept(tmp_path, capsys):
    """The swap that replaces a bundle turned the link into a folder of its own: the bundle it pointed to, with
    teach's versions beside it, was left behind with nothing naming it."""
    bundles = tmp_path / "bundles"
    target = write_grey_bundle(bundles / "line3-v2")
    current = bundles / "current"
    os.symlink("line3-v2", current)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    why = (
        f"{current}: a symbolic link to line3-v2, expected a folder of its own: write the new bundle into a new folder "
        "beside it and switch the link to that (docs/DEPLOY.md, Update a model)"
    )
    written = load_bundle(current)
    with pytest.raises(BundleError) as refused:
        write_bundle(
            current,
            written.manifest,
            written.graph_path,
            written.scorer_params(),
            written.weights(),
            written.thresholds(),
        )
    assert str(refused.value) == f"{why}; not written, it holds what it held before"

    data = make_tiny_mvtec(tmp_path / "data", n_train=4, n_test_good=1, n_test_defect=1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--out", str(current), "--recipe", "aligned", "--size", "64"])
    assert run(args) == 2
    assert capsys.readouterr().err == f"inspectd train: --out {why} (the bundle replaces what is there)\n"
    assert current.is_symlink() and os.readlink(current) == "line3-v2"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "line3-v2"]


def test_a_dangling_link_is_still_written_through_as_before(tmp_path):
    """Only the link goes where it names nothing: train's first run into a path an earlier link left."""
    link = tmp_path / "current"
    os.symlink("gone", link)
    source = load_bundle(write_grey_bundle(tmp_path / "grey"))
    write_bundle(
        link, source.manifest, source.graph_path, source.scorer_params(), source.weights(), source.thresholds()
    )
    assert not link.is_symlink() and load_bundle(link).manifest["model_id"]
    assert Path(tmp_path / "gone").exists() is False
