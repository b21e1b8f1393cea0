"""Fitting the scorers' parameters from features, in numpy: the one implementation that `inspectd train` (through the
torch scorers in engines.model.graph) and `inspectd teach` (on a runtime-only station, without torch) both run, so
the same features and seed give the same parameters on either.

Features are float32 [N, D, h, w], what the graph's feature stage gives (InferenceGraph.embed, or the bundle's
feature graph at runtime). Each fit returns the scorer's graph inputs by name:

    kmeans, kmeans_local   references [K, D, h, w]: real feature maps nearest to spherical k-means centroids
    memory                 memory_bank [M, D]: a greedy k-center coreset of all patches
    gaussian               gauss_mean [D, h, w] and gauss_precision [D, D] (one Ledoit-Wolf covariance)

A recipe's `augment` adds copies of the fitting images (model-input uint8 [N, H, W, C]) before their features are
extracted (`augmented`): "rot180" adds each image turned half a turn, so a memory bank of few images also holds the
part's other orientation of every patch. Where that is admissible (a surface that looks the same turned round, not
an oriented part) is judged by `--recipe auto` (engines.training.select).

Randomness (k-means++ start, the coreset's pool, projection and first point) comes from one
numpy.random.default_rng(seed) per fit, consumed in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_MEMORY_SIZE = 16384
# The coreset is drawn from a random pool this many times the bank's size: greedy selection over every patch of
# hundreds of images costs minutes, and a pool of 16x already holds the rare patterns the selection is for.
CORESET_POOL = 16
CORESET_PROJECTION = 16
KMEANS_ITERATIONS = 50
# Cosine similarities this close count as equal when the nearest training sample is picked (fit_kmeans).
TIE_TOLERANCE = 1e-5
# recipe `augment` -> the copies of the fitting images added besides the images themselves.
AUGMENTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], ...]] = {
    "none": (),
    "rot180": (lambda images: images[:, ::-1, ::-1],),
}


def check_augment(augment: str) -> str:
    """`augment` if it names copies in AUGMENTS; else ValueError in one line."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment {augment!r}: expected one of {', '.join(AUGMENTS)}")
    return augment


def augmented(images: np.ndarray, augment: str) -> np.ndarray:
    """`images` [N, H, W, C] followed by the recipe's copies of them ([N * (1 + copies), H, W, C], contiguous)."""
    copies = AUGMENTS[check_augment(augment)]
    if not copies:
        return images
    return np.ascontiguousarray(np.concatenate([images, *(copy(images) for copy in copies)]))


def _features(features, what: str) -> np.ndarray:
    array = np.asarray(features)
    if array.ndim != 4:
        raise ValueError(f"{what}: features of shape {tuple(array.shape)}, expected [N, D, h, w]")
    if array.shape[0] == 0:
        raise ValueError(f"{what}: no training features")
    return array


def _normalise(rows: np.ndarray) -> np.ndarray:
    # As torch.nn.functional.normalize: rows divided by max(norm, 1e-12).
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))


def fit_kmeans(
    features, k: int = 1, seed: int = 0, iterations: int = KMEANS_ITERATIONS, **_unused
) -> dict[str, np.ndarray]:
    """Spherical k-means (k-means++ start) on the flattened, L2-normalised feature maps; each centroid is then
    replaced by the real training sample nearest to it, as CSE's reference implementation does."""
    features = _features(features, "k-means")
    n = features.shape[0]
    k = max(1, min(int(k), n))
    flat = _normalise(features.reshape(n, -1).astype(np.float32))
    rng = np.random.default_rng(seed)
    centroids = kmeans_plus_plus(flat, k, rng)
    for _ in range(iterations):
        assignment = (flat @ centroids.T).argmax(axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, flat)
        counts = np.bincount(assignment, minlength=centroids.shape[0])
        # An emptied cluster keeps its old centroid instead of collapsing to zero.
        updated = np.where(counts[:, None] > 0, _normalise(sums), centroids).astype(np.float32)
        if np.allclose(updated, centroids):
            break
        centroids = updated
    similarity = centroids @ flat.T
    # The lowest-numbered sample within float noise of the nearest: a two-member cluster's centroid is exactly as
    # near to both, and train (torch features) and teach (ONNX Runtime's, ~1e-6 apart) must keep the same one.
    nearest = np.unique((similarity >= similarity.max(axis=1, keepdims=True) - TIE_TOLERANCE).argmax(axis=1))
    return {"references": np.ascontiguousarray(features[nearest], dtype=np.float32)}


def kmeans_plus_plus(flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit rows with cosine distance; stops early when every row coincides with a seed."""
    chosen = [int(rng.integers(flat.shape[0]))]
    distance = 1.0 - flat @ flat[chosen[0]]
    for _ in range(1, k):
        weights = np.maximum(distance, 0).astype(np.float64)
        total = float(weights.sum())
        if total <= 0:
            break
        chosen.append(int(rng.choice(flat.shape[0], p=weights / total)))
        distance = np.minimum(distance, 1.0 - flat @ flat[chosen[-1]])
    return flat[chosen]


def fit_memory(
    features,
    memory_size: int = DEFAULT_MEMORY_SIZE,
    seed: int = 0,
    projection: int = CORESET_PROJECTION,
    **_unused,
) -> dict[str, np.ndarray]:
    """Keep `memory_size` of the training patches by greedy k-center selection: each step adds the patch farthest
    from everything kept so far, so rare good patterns survive the cut where random sampling would drop them.
    The selection runs over a random pool of CORESET_POOL x `memory_size` patches, with distances taken in a
    random `projection`-dimensional space (Johnson-Lindenstrauss), as PatchCore does."""
    features = _features(features, "memory")
    if memory_size < 1:
        raise ValueError(f"memory_size {memory_size}: expected >= 1")
    n, d, h, w = features.shape
    total = n * h * w  # patches, numbered image by image, row by row
    rng = np.random.default_rng(seed)
    if total > CORESET_POOL * memory_size:
        # Only the pool's patches are gathered: a copy of every patch would double the fit's memory.
        image, place = np.divmod(np.sort(rng.permutation(total)[: CORESET_POOL * memory_size]), h * w)
        patches = np.ascontiguousarray(features[image, :, place // w, place % w], dtype=np.float32)
    else:
        patches = np.ascontiguousarray(features.transpose(0, 2, 3, 1).reshape(-1, d), dtype=np.float32)
        if total <= memory_size:
            return {"memory_bank": patches}
    if projection < d:
        projected = patches @ rng.standard_normal((d, projection)).astype(np.float32)
    else:
        projected = patches
    chosen = greedy_coreset(projected, memory_size, rng)
    return {"memory_bank": np.ascontiguousarray(patches[chosen])}


def greedy_coreset(points: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `size` rows of `points` [P, d] chosen by greedy k-center (farthest-point) selection from a random
    start; squared distances, so each step is one matrix-vector product over the points."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    norms = np.einsum("ij,ij->i", points, points)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(rng.integers(points.shape[0]))
    nearest = np.full_like(norms, np.inf)
    candidate = np.empty_like(norms)
    for i in range(size):
        if i:
            chosen[i] = int(np.argmax(nearest))
        c = chosen[i]
        # |p|^2 - 2 p.c + |c|^2 into one reused buffer: a step is a few passes and no allocation.
        np.dot(points, points[c], out=candidate)
        candidate *= -2.0
        candidate += norms
        candidate += norms[c]
        np.minimum(nearest, candidate, out=nearest)
    return chosen


def fit_gaussian(features, chunk: int = 64, **_unused) -> dict[str, np.ndarray]:
    """Per-location mean and one Ledoit-Wolf covariance of the residuals, accumulated `chunk` images at a time
    in float64 (a float64 copy of all residuals at 256x256 would be ~0.6 GB)."""
    features = _features(features, "gaussian")
    n, d = features.shape[:2]
    mean = features.sum(axis=0, dtype=np.float64) / n
    moments = SecondMoments(d)
    for start in range(0, n, chunk):
        residuals = features[start : start + chunk].astype(np.float64) - mean
        moments.add(residuals.transpose(0, 2, 3, 1).reshape(-1, d))
    covariance = moments.ledoit_wolf()
    # A small ridge keeps it invertible when the residuals carry no information (a single image, or images
    # identical at every location): the distance then degrades to a scaled Euclidean one instead of failing.
    ridge = 1e-4 * float(np.trace(covariance)) / d + 1e-6
    precision = np.linalg.inv(covariance + ridge * np.eye(d))
    precision = 0.5 * (precision + precision.T)  # exact symmetry, so Mahalanobis distances are never negative
    return {
        "gauss_mean": np.ascontiguousarray(mean, dtype=np.float32),
        "gauss_precision": np.ascontiguousarray(precision, dtype=np.float32),
    }


class SecondMoments:
    """X^T X and (X*X)^T (X*X) of centred samples, summed over chunks: all that Ledoit-Wolf needs."""

    def __init__(self, p: int) -> None:
        self.n = 0
        self.xtx = np.zeros((p, p), dtype=np.float64)
        self.x2tx2 = np.zeros((p, p), dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.n += x.shape[0]
        self.xtx += x.T @ x
        x2 = x * x
        self.x2tx2 += x2.T @ x2

    def ledoit_wolf(self) -> np.ndarray:
        """(1 - s) * S + s * mu * I with the shrinkage s minimising the expected error: the estimator sklearn's
        `ledoit_wolf(X, assume_centered=True)` computes."""
        n, p = self.n, self.xtx.shape[0]
        emp_cov = self.xtx / n
        mu = np.trace(emp_cov) / p
        delta_sum = (emp_cov * emp_cov).sum()  # = sum((X^T X)^2) / n^2
        beta = (self.x2tx2.sum() / n - delta_sum) / (p * n)
        delta = (delta_sum - 2 * mu * np.trace(emp_cov) + p * mu * mu) / p
        beta = min(beta, delta)
        shrinkage = beta / delta if delta > 0 else 0.0
        return (1 - shrinkage) * emp_cov + shrinkage * mu * np.eye(p)


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred samples x [n, p]."""
    moments = SecondMoments(np.asarray(x).shape[1])
    moments.add(x)
    return moments.ledoit_wolf()


FITS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "kmeans": fit_kmeans,
    "kmeans_local": fit_kmeans,
    "gaussian": fit_gaussian,
    "memory": fit_memory,
}


def fit_scorer(kind: str, features, **settings) -> dict[str, np.ndarray]:
    """The parameters of scorer `kind` fitted on `features` [N, D, h, w]; `settings` are the recipe's (k, seed,
    memory_size); ones a scorer does not use are ignored."""
    if kind not in FITS:
        raise ValueError(f"scorer {kind!r}: expected one of {', '.join(FITS)}")
    return FITS[kind](features, **settings)
