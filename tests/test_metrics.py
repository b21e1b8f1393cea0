"""Metrics against independent references: scikit-learn for AUROC, brute force for F1-max, hand-made maps for AUPRO."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score

from engines.training.metrics import PixelHistograms, auroc, bin_floor, f1_max, order_keys, partial_area


def _two_class(rng, n, p=0.4):
    labels = rng.random(n) < p
    labels[:2] = [True, False]
    return labels


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_on_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    labels = _two_class(rng, 300)
    scores = rng.normal(size=300) + labels * rng.uniform(0, 2)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_counts_ties_as_half(seed):
    rng = np.random.default_rng(seed)
    labels = _two_class(rng, 200)
    scores = rng.integers(0, 4, size=200) + labels  # few distinct values: many ties across the classes
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == 0.5


def test_auroc_refuses_one_class_and_nan():
    with pytest.raises(ValueError, match="both defective and defect-free"):
        auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="one label per score"):
        auroc([0, 1, 1], [0.1, 0.2])


def _f1_brute_force(labels, scores):
    best = (-1.0, None)
    for t in sorted(set(scores.tolist())):
        flagged = scores >= t
        tp = np.sum(flagged & labels)
        fp = np.sum(flagged & ~labels)
        fn = np.sum(~flagged & labels)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0] + 1e-15:  # ascending thresholds: a tie keeps the lowest threshold, as f1_max does
            best = (f1, t)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = _two_class(rng, 120)
    scores = np.round(rng.normal(size=120) + labels, 1 if seed % 2 else 6)  # odd seeds: heavy ties
    f1, threshold = f1_max(labels, scores)
    ref_f1, ref_threshold = _f1_brute_force(labels, scores)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert threshold == ref_threshold
    flagged = scores >= threshold
    assert 2 * np.sum(flagged & labels) / (np.sum(flagged) + np.sum(labels)) == pytest.approx(f1)


def test_f1_max_perfect_separation():
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, pytest.approx(0.8))


def test_order_keys_are_monotonic_and_bins_floor_their_values():
    rng = np.random.default_rng(0)
    values = np.sort(np.concatenate([rng.normal(0, 1, 5000), rng.normal(0, 1e4, 100), [-0.0, 0.0, 1e-38]]))
    values = values.astype(np.float32)
    keys = order_keys(values).astype(np.int64)
    assert np.all(np.diff(keys) >= 0)
    floors = bin_floor(keys.astype(np.uint32))
    assert np.all(floors <= values)
    # A bin is 2^-11 wide relative to its value.
    big = np.abs(values) > 1e-30
    assert np.all(np.abs(values[big] - floors[big]) <= np.abs(values[big]) * 2.0**-10)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_over_all_pixels(seed):
    rng = np.random.default_rng(seed)
    hist = PixelHistograms()
    all_scores, all_labels = [], []
    for i in range(12):
        h, w = rng.integers(20, 60, size=2)
        mask = np.zeros((h, w), bool)
        if i % 3:
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            mask[y : y + 8, x : x + 8] = True
        amap = (rng.gamma(2.0, 1.0, size=(h, w)) + 1.5 * mask).astype(np.float32)
        hist.add(amap, mask if mask.any() else None)
        all_scores.append(amap.ravel())
        all_labels.append(mask.ravel())
    reference = roc_auc_score(np.concatenate(all_labels), np.concatenate(all_scores))
    assert hist.auroc() == pytest.approx(reference, abs=2e-4)
    assert hist.n_normal + hist.n_defect == sum(s.size for s in all_scores)


def test_pixel_auroc_exact_on_tied_maps():
    rng = np.random.default_rng(7)
    hist = PixelHistograms()
    scores, labels = [], []
    for _ in range(5):
        mask = rng.random((30, 40)) < 0.2
        amap = (rng.integers(0, 5, size=(30, 40)) + mask).astype(np.float32)  # integers: exact ties
        hist.add(amap, mask)
        scores.append(amap.ravel())
        labels.append(mask.ravel())
    assert hist.auroc() == pytest.approx(roc_auc_score(np.concatenate(labels), np.concatenate(scores)), abs=1e-12)


def _two_region_image():
    mask = np.zeros((64, 64), bool)
    mask[5:15, 5:15] = True  # region A
    mask[40:60, 30:50] = True  # region B (larger: weights must not favour it)
    return mask


def test_aupro_perfect_map_is_one():
    mask = _two_region_image()
    hist = PixelHistograms()
    hist.add(mask.astype(np.float32), mask)
    hist.add(np.zeros((64, 64), np.float32))  # a good image
    assert hist.n_regions == 2
    assert hist.aupro() == pytest.approx(1.0)
    assert hist.auroc() == pytest.approx(1.0)


def test_aupro_missing_one_of_two_regions_is_one_half():
    mask = _two_region_image()
    amap = np.zeros((64, 64), np.float32)
    amap[5:15, 5:15] = 1.0  # region A found
    amap[40:60, 30:50] = -1.0  # region B scored below all background: never found before FPR 1
    hist = PixelHistograms()
    hist.add(amap, mask)
    assert hist.aupro() == pytest.approx(0.5)


def test_aupro_missed_region_like_background_follows_fpr():
    # Region B scores like the background: its overlap grows with the FPR, PRO(fpr) = 0.5 + 0.5 fpr,
    # so the normalised area up to 0.3 is 0.5 + 0.075.
    rng = np.random.default_rng(1)
    mask = _two_region_image()
    amap = rng.random((64, 64)).astype(np.float32)
    amap[5:15, 5:15] = 2.0
    hist = PixelHistograms()
    hist.add(amap, mask)
    assert hist.aupro() == pytest.approx(0.575, abs=0.02)


def test_aupro_averages_regions_not_pixels():
    # Finding only the small region is worth the same as finding only the big one.
    mask = _two_region_image()
    results = []
    for found in ((slice(5, 15), slice(5, 15)), (slice(40, 60), slice(30, 50))):
        amap = np.zeros((64, 64), np.float32)
        amap[mask] = -1.0
        amap[found] = 1.0
        hist = PixelHistograms()
        hist.add(amap, mask)
        results.append(hist.aupro())
    assert results[0] == pytest.approx(results[1]) == pytest.approx(0.5)


def test_histograms_add_up_like_one_stream():
    rng = np.random.default_rng(3)
    maps = [rng.random((20, 20)).astype(np.float32) for _ in range(4)]
    masks = [None, rng.random((20, 20)) < 0.3, None, rng.random((20, 20)) < 0.3]
    one, a, b = PixelHistograms(), PixelHistograms(), PixelHistograms()
    for i, (m, k) in enumerate(zip(maps, masks)):
        one.add(m, k)
        (a if i % 2 else b).add(m, k)
    merged = a + b
    assert merged.auroc() == one.auroc()
    assert merged.aupro() == one.aupro()
    assert merged.n_regions == one.n_regions


def _exact_aupro(maps, masks, fpr_limit=0.3):
    """MVTec AD's compute_pro without bins: every distinct value is a threshold, regions are scipy's 8-connected
    labels, each region's pixels weigh 1/size, the FPR runs over every defect-free pixel."""
    values, fp, overlap, n_regions = [], [], [], 0
    for amap, mask in zip(maps, masks):
        labels, n = label(mask, structure=np.ones((3, 3), int))
        sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
        weight = np.where(labels > 0, 1.0 / sizes[labels], 0.0)
        values.append(amap.ravel().astype(np.float64))
        fp.append((labels == 0).ravel())
        overlap.append(weight.ravel())
        n_regions += n
    values, fp, overlap = np.concatenate(values), np.concatenate(fp), np.concatenate(overlap)
    order = np.argsort(-values, kind="stable")
    last_of_value = np.append(np.diff(values[order]) != 0, True)  # equal values are one threshold
    fpr = np.r_[0.0, (np.cumsum(fp[order]) / fp.sum())[last_of_value]]
    pro = np.r_[0.0, (np.cumsum(overlap[order]) / n_regions)[last_of_value]]
    return partial_area(fpr, pro, fpr_limit) / fpr_limit


@pytest.mark.parametrize("offset, outlier", [(100.0, None), (1000.0, None), (100.0, -1000.0)])
def test_pixel_metrics_do_not_depend_on_the_maps_offset(offset, outlier):
    """Maps far from zero with a small spread (a Gaussian scorer's distances): bins relative to the raw value put most
    pixels of both classes in a few bins (AUPRO 0.26 against 0.48 at offset 1000). Keyed on the first map's median,
    and added up from a good and a defect histogram on that one reference, both metrics stay exact to 1e-4; also when
    the first map holds one outlying pixel (a minimum would have widened every bin: AUROC off by 0.2)."""
    rng = np.random.default_rng(0)
    good = PixelHistograms(reference=None)
    defect = None
    maps, masks = [], []
    for i in range(8):
        mask = np.zeros((64, 64), bool)
        if i % 4:
            mask[20:30, 20:30] = True
            mask[44:48, 10:40] = True
        amap = (offset + rng.normal(0, 0.05, (64, 64)) + 0.05 * mask).astype(np.float32)
        if i == 0 and outlier is not None:
            amap[0, 0] = outlier
        if mask.any():
            if defect is None:
                defect = PixelHistograms(good.reference)
            defect.add(amap, mask)
        else:
            good.add(amap)
        maps.append(amap)
        masks.append(mask)
    both = good + defect
    reference = roc_auc_score(np.concatenate(masks).ravel(), np.concatenate(maps).ravel())
    assert both.auroc() == pytest.approx(reference, abs=1e-4)
    assert both.aupro() == pytest.approx(_exact_aupro(maps, masks), abs=1e-4)
    # The colour scale's quantiles come back in the maps' own values, not relative to the reference.
    assert both.quantile(0.5) == pytest.approx(float(np.median(np.concatenate(maps))), abs=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_a_pixel_threshold_far_from_zero_flags_at_most_the_good_pixels_it_promises(seed):
    """The daemon compares float32 maps with the threshold (`frame_map >= pixel_thr`), which NumPy 2 casts to float32
    to the nearest value. At 1000 +- 0.05 a float32 step is 6e-5, and a threshold rounded down onto the bin below
    flagged pixels calibrate had counted under it; the threshold is the smallest float32 at or above the bin's floor."""
    from calibration.calibrate import pixel_threshold_for_fpr

    rng = np.random.default_rng(seed)
    maps = [(1000.0 + rng.normal(0, 0.05, (64, 64))).astype(np.float32) for _ in range(4)]
    good = PixelHistograms(reference=None)
    for m in maps:
        good.add(m)
    pixels = np.concatenate([m.ravel() for m in maps])
    for fpr in (0.5, 0.3, 0.1, 0.05, 0.01, 0.001):
        threshold = pixel_threshold_for_fpr(good, fpr)
        flagged = int(np.count_nonzero(pixels >= threshold))
        assert flagged <= math.floor(fpr * pixels.size), (fpr, threshold, flagged)
        assert float(np.float32(threshold)) == threshold


def test_a_pixel_threshold_just_above_the_reference_is_above_it_in_float32():
    """The bin just above the reference's own has a floor of 1e-40 or so, which vanishes when added to 1000 in float64:
    the threshold must still sit above the pixels at the reference, which were counted below it."""
    from calibration.calibrate import pixel_threshold_for_fpr

    good = PixelHistograms(reference=None)
    good.add(np.array([[999.0, 1000.0, 1001.0]], np.float32))
    assert good.reference == 1000.0
    threshold = pixel_threshold_for_fpr(good, 0.5)  # at most 1 of the 3 at or above it
    assert threshold == float(np.nextafter(np.float32(1000.0), np.float32(np.inf)))
    assert int(np.count_nonzero(np.array([999.0, 1000.0, 1001.0], np.float32) >= threshold)) == 1


def test_histograms_on_different_references_refuse_to_add():
    a, b = PixelHistograms(reference=None), PixelHistograms(reference=None)
    a.add(np.full((4, 4), 1.0, np.float32))
    b.add(np.full((4, 4), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"^pixel histograms: references 1.0 and 2.0 differ, expected"):
        a + b
    assert (a + PixelHistograms(reference=None)).reference == 1.0  # an empty one takes any reference
    with pytest.raises(ValueError, match="reference nan, expected a finite number"):
        PixelHistograms(reference=float("nan"))


def test_quantile_is_a_value_seen_even_at_the_ends():
    """q = 0, any q * total within the lowest non-empty bin's count, and q = 1 all name a bin that holds pixels."""
    flat = PixelHistograms()
    flat.add(np.full((4, 4), 2.0, np.float32))
    assert flat.quantile(0.0) == flat.quantile(0.5) == flat.quantile(1.0) == 2.0
    two = PixelHistograms()
    two.add(np.array([[1.0, 1.0, 1.0, 5.0]], np.float32))
    assert two.quantile(0.0) == two.quantile(0.01) == two.quantile(0.75) == 1.0
    assert two.quantile(0.76) == two.quantile(1.0) == 5.0


def test_pixel_histograms_refuse_bad_input():
    hist = PixelHistograms()
    with pytest.raises(ValueError, match="2-D"):
        hist.add(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        hist.add(np.zeros((2, 2), np.float32), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="NaN"):
        hist.add(np.full((2, 2), np.nan, np.float32))
    hist.add(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="needs defect and defect-free"):
        hist.auroc()


def test_partial_area_interpolates_at_the_limit():
    x = np.array([0.0, 0.2, 0.6, 1.0])
    y = np.array([0.0, 0.4, 0.8, 1.0])
    # Up to 0.3: triangle to (0.2, 0.4), then trapezoid to (0.3, 0.5).
    assert partial_area(x, y, 0.3) == pytest.approx(0.2 * 0.4 / 2 + 0.1 * (0.4 + 0.5) / 2)
