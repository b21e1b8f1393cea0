"""Synthetic defects and SLA soft labels: hand-computed labels, invalid transformations, shapes, seeds, masks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from engines.data import defects
from engines.data.images import decode_image
from engines.data.synthline import SyntheticLine

pytestmark = pytest.mark.timeout(60)


def surface(channels: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """A textured defect-free frame from the synthetic line, round-tripped through PNG and OpenCV decoding."""
    line = SyntheticLine(width=size, height=size, channels=channels, defect_rate=0.0, seed=seed)
    image, _ = line.next()
    ok, png = cv2.imencode(".png", image if channels == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return decode_image(png.tobytes())


# --------------------------------------------------------------------------------------------------- soft labels
def test_half_changed_10x10_region_is_0_98661():
    original = np.full((32, 32), 100, np.uint8)
    transformed = original.copy()
    transformed[5:10, 5:15] = 200  # exactly 50 changed pixels inside a 10x10 destination region
    y = defects.soft_label(original, transformed, (10, 10))
    assert y == pytest.approx(2 / (1 + math.exp(-5)) - 1, abs=1e-12)
    assert round(y, 5) == 0.98661


def test_changes_at_or_below_eps_count_zero():
    original = np.full((20, 20), 100, np.uint8)
    transformed = original.copy()
    transformed[:10, :10] = 105  # 5/255 = 0.0196 < 0.02: imperceptible, not counted
    assert defects.soft_label(original, transformed, (10, 10)) == 0.0
    transformed[:1, :10] = 106  # 6/255 = 0.0235 > 0.02: these 10 pixels count -> V' = 0.1
    assert defects.soft_label(original, transformed, (10, 10)) == pytest.approx(2 / (1 + math.exp(-1)) - 1)


def test_multichannel_difference_is_summed_over_channels():
    original = np.full((20, 20, 3), 100, np.uint8)
    transformed = original.copy()
    transformed[:5, :5] += 2  # 2/255 per channel is below eps, 6/255 summed over three channels is above
    assert defects.soft_label(original, transformed, (5, 5)) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert defects.soft_label(original[..., :1], transformed[..., :1], (5, 5)) == 0.0


def test_float_images_are_read_on_unit_scale():
    original = np.zeros((10, 10), np.float32)
    transformed = original.copy()
    transformed[:2, :] = 0.03
    assert defects.soft_label(original, transformed, (10, 10)) == pytest.approx(2 / (1 + math.exp(-2)) - 1)


def test_pasting_identical_content_is_an_invalid_transformation_with_label_zero():
    flat = np.full((64, 64), 77, np.uint8)
    cut = defects.cutpaste(flat, np.random.default_rng(3), jitter=0.0)
    assert cut.mask.any()
    assert np.array_equal(cut.image, flat)
    assert defects.soft_label(flat, cut.image, cut.region_wh) == 0.0


def test_real_cutpaste_label_matches_changed_fraction():
    image = surface(1)
    cut = defects.cutpaste(image, np.random.default_rng(5))
    w, h = cut.region_wh
    changed = np.count_nonzero(np.abs(image.astype(int) - cut.image) > 0.02 * 255)
    assert 0 < changed <= w * h
    expected = 2 / (1 + math.exp(-10 * changed / (w * h))) - 1
    assert defects.soft_label(image, cut.image, cut.region_wh) == pytest.approx(expected)


def test_soft_label_rejects_mismatched_shapes_and_empty_regions():
    a = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="shapes"):
        defects.soft_label(a, np.zeros((8, 9), np.uint8), (4, 4))
    with pytest.raises(ValueError, match="region_wh"):
        defects.soft_label(a, a, (0, 4))


# --------------------------------------------------------------------------------------------------- transformations
@pytest.mark.parametrize("name", sorted(defects.DEFECTS))
@pytest.mark.parametrize("shape_kind", ["gray2d", "gray3d", "rgb"])
def test_shape_dtype_kept_and_only_the_mask_changes(name, shape_kind):
    image = surface(3 if shape_kind == "rgb" else 1, seed=1)
    if shape_kind == "gray3d":
        image = image[:, :, None]
    before = image.copy()
    result = defects.DEFECTS[name](image, np.random.default_rng(11))
    assert result.image.shape == image.shape and result.image.dtype == np.uint8
    assert np.array_equal(image, before), "the input must not be modified"
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    assert result.mask.any()
    changed = np.abs(result.image.astype(int) - image).reshape(*image.shape[:2], -1).sum(axis=2) > 0
    assert changed.any(), "a transformation of a textured image must change something"
    assert not (changed & ~result.mask).any(), "pixels outside the mask must be untouched"
    x, y, w, h = result.box
    assert 0 <= x and 0 <= y and x + w <= image.shape[1] and y + h <= image.shape[0]
    ys, xs = np.nonzero(result.mask)
    assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
    assert 0.0 < defects.soft_label(image, result.image, result.region_wh) < 1.0 + 1e-9


@pytest.mark.parametrize("name", sorted(defects.DEFECTS))
def test_same_seed_same_defect_other_seed_other_defect(name):
    image = surface(3, seed=2)
    first = defects.DEFECTS[name](image, np.random.default_rng(42))
    again = defects.DEFECTS[name](image, np.random.default_rng(42))
    other = defects.DEFECTS[name](image, np.random.default_rng(43))
    assert np.array_equal(first.image, again.image) and first.box == again.box
    assert np.array_equal(first.mask, again.mask)
    assert not np.array_equal(first.image, other.image)


def test_cutpaste_region_follows_the_paper_sizes():
    image = surface(1, size=256)
    rng = np.random.default_rng(0)
    for _ in range(50):
        cut = defects.cutpaste(image, rng)
        w, h = cut.region_wh
        assert 0.015 * 256 * 256 <= w * h <= 0.16 * 256 * 256
        assert 0.29 <= w / h <= 1 / 0.29
        scar = defects.cutpaste_scar(image, rng)
        sw, sh = scar.region_wh
        assert 2 <= sw <= 16 and 10 <= sh <= 25
        # A rotated scar writes about its own area, not its bounding box.
        assert scar.mask.sum() <= 1.5 * sw * sh


def test_perlin_mask_is_never_empty_and_noise_is_bounded():
    rng = np.random.default_rng(9)
    for _ in range(20):
        assert defects.perlin_mask((64, 48), rng, threshold=0.95).any()
    noise = defects.perlin_noise((100, 70), (4, 8), rng)
    assert noise.shape == (100, 70) and noise.dtype == np.float32
    assert np.abs(noise).max() <= 1.5 and noise.std() > 0.05


def test_shading_changes_a_large_region_in_tone_and_grain():
    image = surface(1, size=128)
    rng = np.random.default_rng(3)
    for _ in range(20):
        result = defects.shading(image, rng)
        inside = result.mask
        assert 0.05 <= inside.mean() <= 0.7, "an uneven finish covers a large share of the part"
        before, after = image[inside].astype(np.float32), result.image[inside].astype(np.float32)
        tone = after.mean() / before.mean()
        grain = after.std() / max(before.std(), 1e-6)
        assert abs(tone - 1.0) > 0.05 or grain > 1.1, (tone, grain)


def test_defect_mix_parses_and_draws_by_weight():
    mix = defects.parse_mix("perlin:3, cutpaste")
    assert mix == {"perlin": 0.75, "cutpaste": 0.25}
    rng = np.random.default_rng(0)
    image = surface(1, size=64)
    names = [defects.random_defect(image, rng, mix)[0] for _ in range(200)]
    assert 0.6 < names.count("perlin") / 200 < 0.9
    with pytest.raises(ValueError, match="unknown defect 'blob'"):
        defects.parse_mix("blob:1")
    with pytest.raises(ValueError, match="not a number"):
        defects.parse_mix("perlin:x")


def test_non_uint8_or_bad_shape_is_refused():
    with pytest.raises(ValueError, match="expected uint8"):
        defects.cutpaste(np.zeros((32, 32), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="expected HxW"):
        defects.cutout(np.zeros((32, 32, 2), np.uint8), np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------- synthetic line
def test_synthetic_line_seed_alone_decides_its_frames(tmp_path):
    """A seed reproduces a folder whatever else in the process drew random numbers before (OpenCV's RNG is shared)."""
    first = [
        cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in SyntheticLine(48, 48, seed=3).write_folder(tmp_path / "a", 3)
    ]
    cv2.randn(np.empty((64, 64), np.float32), 0.0, 1.0)  # type: ignore[call-overload]
    np.random.standard_normal(16)
    again = [
        cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in SyntheticLine(48, 48, seed=3).write_folder(tmp_path / "b", 3)
    ]
    other = SyntheticLine(48, 48, seed=4).next()[0]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other)
