"""Detection metrics: image AUROC, F1-max, and streaming pixel AUROC / AUPRO.

Numpy only (scikit-learn is a test-time cross-check, never a runtime dependency).

Image-level metrics are exact: AUROC is the Mann-Whitney statistic with ties counted as one half, F1-max is taken
over every distinct score used as the threshold (`score >= threshold` is a defect, as in the thresholds file).

Pixel-level metrics must cover every pixel of every test image at its own frame size (magnetic_tile: 575 images,
61 M pixels) without holding the maps. `PixelHistograms` streams them into fixed histograms over an order-preserving
20-bit key of the float32 difference `value - reference` (sign, 8 exponent bits, the top 11 mantissa bits): 2^20
bins, each 2^-11 (0.05 %) wide relative to that difference. With the reference among the maps' values (the first
added map's median: `reference=None`; not its minimum, which one outlying pixel would set) a bin is at most 2^-11 of
the maps' range wide, whatever their offset. Keyed on the
raw value (`reference=0.0`, the default; eval, auto, calibrate and teach all key on the median) the bins are
relative to the offset instead: maps at 100 +- 0.05 lose 7e-3 of pixel AUROC and 1e-2 of AUPRO, at 1000 +- 0.05 0.09
and 0.2. Memory is constant (three 8 MB histograms), histograms of disjoint image sets on one reference add up
(per-defect-type metrics are `good + type`), and the only approximation is that pixels in one bin count as tied. That
bounds the error of pixel AUROC by half the fraction of defect/normal pixel pairs that share a bin. Keyed on the first
map's median, pixel AUROC is within 2e-5 of scikit-learn and AUPRO within 2e-5 of an exact AUPRO on maps at offsets
0 to 1000 with spreads 0.05 to 5 (tests/test_metrics.py asserts 1e-4 at offsets 100 and 1000).

AUPRO follows MVTec AD (Bergmann et al., IJCV 2021): the ground truth is split into connected components
(8-connectivity, cv2.connectedComponents), the per-region overlap at each threshold is averaged over all regions of
all images, plotted against the false-positive rate over all defect-free pixels, integrated up to FPR 0.3 (linear
interpolation at 0.3) and divided by 0.3. The average over regions is a weighted histogram: every defect pixel
carries weight 1 / (its region's size), so the overlap curve needs no per-region state either.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

KEY_BITS = 20
N_BINS = 1 << KEY_BITS
_SHIFT = np.uint32(32 - KEY_BITS)
_SIGN = np.uint32(0x80000000)
AUPRO_FPR_LIMIT = 0.3
# Pixels are binned in chunks of this many so bincount's 8 MB output is paid per chunk, not per image.
_FLUSH_PIXELS = 1 << 22


def _as_labels_and_scores(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{what}: {labels.size} labels for {scores.size} scores, expected one label per score")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: scores contain NaN or infinity, expected finite numbers")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError(
            f"{what}: needs both defective and defect-free samples, got only "
            f"{'defective' if labels.all() else 'defect-free'} ({labels.size})"
        )
    return labels, scores


def _auc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney AUROC from counts per bin (bins in ascending score order; equal bin = tie = one half)."""
    positive = positive.astype(np.float64)
    negative = negative.astype(np.float64)
    n_pos, n_neg = positive.sum(), negative.sum()
    # For each bin: positives strictly above it (full credit) plus half of those inside it (ties).
    above = n_pos - np.cumsum(positive)
    return float(np.dot(negative, above + 0.5 * positive) / (n_pos * n_neg))


def auroc(labels, scores) -> float:
    """Image AUROC (exact, ties as one half). labels: truthy = defective; scores: higher = more anomalous."""
    labels, scores = _as_labels_and_scores(labels, scores, "auroc")
    _, bins = np.unique(scores, return_inverse=True)
    n = int(bins.max()) + 1
    return _auc_from_histograms(np.bincount(bins[labels], minlength=n), np.bincount(bins[~labels], minlength=n))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds (`score >= threshold` is a defect) and the lowest threshold that reaches it."""
    labels, scores = _as_labels_and_scores(labels, scores, "f1_max")
    values, bins = np.unique(scores, return_inverse=True)
    n = values.size
    pos = np.bincount(bins[labels], minlength=n)[::-1]
    neg = np.bincount(bins[~labels], minlength=n)[::-1]
    # Thresholds from the highest distinct score down: flagged = everything at or above it.
    tp = np.cumsum(pos)
    fp = np.cumsum(neg)
    f1 = 2.0 * tp / (tp + fp + labels.sum())
    best = int(np.argmax(f1))
    # argmax picks the first (highest) threshold among equal F1 values; report the lowest one that reaches the same
    # F1 so that ties resolve towards catching defects.
    best = int(np.flatnonzero(f1 == f1[best])[-1])
    return float(f1[best]), float(values[::-1][best])


def order_keys(values: np.ndarray) -> np.ndarray:
    """The histogram bin of each float32 value: its bit pattern made order-preserving, top KEY_BITS bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    negative = (bits & _SIGN) != 0
    keys = np.where(negative, ~bits, bits | _SIGN)
    # -0.0 equals 0.0 and must share its bin.
    keys[bits == _SIGN] = _SIGN
    return keys >> _SHIFT


def bin_floor(keys: np.ndarray) -> np.ndarray:
    """The smallest float32 value in each bin (inverse of `order_keys` up to the dropped low bits)."""
    keys = np.asarray(keys, dtype=np.uint32) << _SHIFT
    negative = (keys & _SIGN) == 0
    # Negative values were stored inverted: the bin's lowest key is its largest magnitude, i.e. its smallest value.
    bits = np.where(negative, ~keys, keys & ~_SIGN)
    return bits.view(np.float32)


@dataclasses.dataclass
class PixelHistograms:
    """Per-bin pixel counts of defect-free pixels (`normal`), defect pixels (`defect`), and defect pixels weighted by
    1/(size of their ground-truth region) (`region_weight`), plus the number of regions.

    Bins are keyed on `value - reference` (a reference is kept as a float32 value). None fixes the reference at the
    first added map's median, so bins follow the maps' spread; histograms that will be added must then be made with
    the first one's `reference`. The default 0.0 keys the raw value, whose bins `bin_floor` reads back directly."""

    reference: float | None = 0.0
    normal: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(N_BINS, np.int64))
    defect: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(N_BINS, np.int64))
    region_weight: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(N_BINS, np.float64))
    n_regions: int = 0

    def __post_init__(self) -> None:
        if self.reference is not None:
            if not (np.isfinite(self.reference) and abs(self.reference) <= np.finfo(np.float32).max):
                raise ValueError(f"pixel histograms: reference {self.reference}, expected a finite number in float32")
            # A float32 value: float32 maps subtract it as float32, so keys and `bin_floor` use the same number.
            self.reference = float(np.float32(self.reference))
        self._pending_normal: list[np.ndarray] = []
        self._pending_defect: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_pixels = 0

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray | None = None, what: str = "anomaly map") -> None:
        """One image: its map (float, HxW) and ground-truth mask (bool HxW, None or all-False when defect-free)."""
        if anomaly_map.ndim != 2:
            raise ValueError(f"{what}: shape {anomaly_map.shape}, expected a 2-D HxW map")
        if mask is not None and mask.shape != anomaly_map.shape:
            raise ValueError(f"{what}: mask shape {mask.shape} differs from map shape {anomaly_map.shape}")
        if not np.isfinite(anomaly_map).all():
            raise ValueError(f"{what}: contains NaN or infinity, expected finite scores")
        if self.reference is None:
            # The median, not the minimum: one outlying pixel must not widen every bin of every map.
            self.reference = float(np.float32(np.median(anomaly_map)))
        keys = order_keys(anomaly_map - self.reference)
        if mask is None or not mask.any():
            self._pending_normal.append(keys.ravel())
        else:
            n_labels, regions = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            regions = regions.ravel()
            inside = regions > 0
            sizes = np.bincount(regions, minlength=n_labels).astype(np.float64)
            weights = (1.0 / np.maximum(sizes, 1.0))[regions[inside]]
            flat = keys.ravel()
            self._pending_normal.append(flat[~inside])
            self._pending_defect.append((flat[inside], weights))
            self.n_regions += n_labels - 1
        self._pending_pixels += keys.size
        if self._pending_pixels >= _FLUSH_PIXELS:
            self._flush()

    def _flush(self) -> None:
        if self._pending_normal:
            self.normal += np.bincount(np.concatenate(self._pending_normal), minlength=N_BINS)
        if self._pending_defect:
            keys = np.concatenate([k for k, _ in self._pending_defect])
            weights = np.concatenate([w for _, w in self._pending_defect])
            self.defect += np.bincount(keys, minlength=N_BINS)
            self.region_weight += np.bincount(keys, weights=weights, minlength=N_BINS)
        self._pending_normal.clear()
        self._pending_defect.clear()
        self._pending_pixels = 0

    def __add__(self, other: PixelHistograms) -> PixelHistograms:
        # Nothing was added to a histogram whose reference is still open: any other reference fits it.
        if self.reference is not None and other.reference is not None and self.reference != other.reference:
            raise ValueError(
                f"pixel histograms: references {self.reference!r} and {other.reference!r} differ, expected histograms "
                "keyed on one reference (make each with the same reference=)"
            )
        self._flush()
        other._flush()
        return PixelHistograms(
            reference=self.reference if self.reference is not None else other.reference,
            normal=self.normal + other.normal,
            defect=self.defect + other.defect,
            region_weight=self.region_weight + other.region_weight,
            n_regions=self.n_regions + other.n_regions,
        )

    @property
    def n_normal(self) -> int:
        self._flush()
        return int(self.normal.sum())

    @property
    def n_defect(self) -> int:
        self._flush()
        return int(self.defect.sum())

    def auroc(self) -> float:
        """Pixel AUROC over every pixel added (ties within one bin count one half)."""
        self._flush()
        if not self.n_defect or not self.n_normal:
            raise ValueError(
                f"pixel auroc: needs defect and defect-free pixels, got {self.n_defect} defect and "
                f"{self.n_normal} defect-free"
            )
        return _auc_from_histograms(self.defect, self.normal)

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, mean per-region overlap) for every bin threshold from the highest down, starting at (0, 0)."""
        self._flush()
        if not self.n_regions or not self.n_normal:
            raise ValueError(
                f"aupro: needs ground-truth regions and defect-free pixels, got {self.n_regions} regions "
                f"and {self.n_normal} defect-free pixels"
            )
        used = np.flatnonzero((self.normal > 0) | (self.defect > 0))[::-1]
        fpr = np.concatenate(([0.0], np.cumsum(self.normal[used]) / self.n_normal))
        pro = np.concatenate(([0.0], np.cumsum(self.region_weight[used]) / self.n_regions))
        return fpr, pro

    def aupro(self, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
        """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1.0 is perfect)."""
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"aupro: fpr_limit {fpr_limit}, expected a value in (0, 1]")
        fpr, pro = self.pro_curve()
        return partial_area(fpr, pro, fpr_limit) / fpr_limit

    def quantile(self, q: float) -> float:
        """Approximate (bin floor) q-quantile of all pixel values, for colour scales."""
        self._flush()
        counts = self.normal + self.defect
        total = counts.sum()
        if not total:
            raise ValueError("quantile: no pixels added")
        # Only non-empty bins can answer: over all bins, q = 0 stops at bin 0 and q > 1 at the last one, both of whose
        # floors are NaN bit patterns, and no value was ever seen in any empty bin.
        used = np.flatnonzero(counts)
        index = min(int(np.searchsorted(np.cumsum(counts[used]), q * total, side="left")), used.size - 1)
        return float(self.bin_floor(used[index : index + 1])[0])

    def bin_floor(self, bins: np.ndarray) -> np.ndarray:
        """The smallest float32 value at or above each of these bins' floors in map values (as float64): a threshold
        read back here flags, as `float32 map >= threshold`, no pixel counted below its bin."""
        floor = bin_floor(bins).astype(np.float64)
        reference = self.reference or 0.0
        total = floor + reference
        # The exact sum is total + error (two-sum): a float32 floor far below the reference can vanish in float64.
        error = (floor - (total - (total - floor))) + (reference - (total - floor))
        # The daemon compares float32 maps, which casts the threshold to float32 (NumPy 2) to the nearest value,
        # sometimes below the floor: pixels of the bin below, counted as under the threshold, would be flagged.
        nearest = total.astype(np.float32)
        below = (nearest.astype(np.float64) < total) | ((nearest.astype(np.float64) == total) & (error > 0))
        return np.where(below, np.nextafter(nearest, np.float32(np.inf)), nearest).astype(np.float64)


def partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the piecewise-linear curve (x ascending) from x[0] to x_max, interpolating at x_max."""
    cut = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:cut], y[:cut]
    if cut < x.size and xs[-1] < x_max:
        # The curve may jump vertically at one x (several points share it); interpolate from the last point below.
        x0, y0, x1, y1 = x[cut - 1], y[cut - 1], x[cut], y[cut]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))
