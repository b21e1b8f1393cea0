"""The bundle format's names, in one place: its files, the manifest's required keys, and the graph's inputs and
outputs that every backend, the exporter and the plan builder bind by name (docs/ARCHITECTURE.md).

The graph takes `pixels` uint8 [N, H, W, C] (N dynamic), then the scorer parameters in the manifest's
`scorer_inputs` order, and gives `score` float32 [N] and `anomaly_map` float32 [N, H, W].
"""

from __future__ import annotations

import re

FORMAT = "inspectd-bundle"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
SCORER = "scorer.npz"
WEIGHTS = "weights.npz"
THRESHOLDS = "thresholds.json"
REQUIRED_FILES = (GRAPH, SCORER, WEIGHTS, THRESHOLDS)
# The map's blur (Gaussian sigma, map pixels) of a recipe or an architecture that names none.
DEFAULT_SIGMA = 4.0
# How a frame is fitted to the model input (engines.runtime.preprocess): stretched, or letterboxed.
RESIZE_POLICIES = ("stretch", "pad")
# `input.resample` of a bundle whose frames are resized axis by axis, averaged along an axis that shrinks wherever the
# other grows (engines.runtime.preprocess). A bundle without it (written before) is fitted as it was trained: in one
# step, where such an axis was sampled without averaging; its memory and thresholds were set on those inputs.
EACH_AXIS = "each_axis"
# Significant bits of the 16-bit frames a bundle judges (`input.bit_depth`, engines.data.images.narrow_to_uint8),
# recorded when it was trained on 16-bit images or told; without it (trained on 8-bit images, or written before
# depths were recorded) 16-bit frames are narrowed as 16-bit (>> 8).
BIT_DEPTHS = range(8, 17)
BIT_DEPTH_RANGE = "an integer 8-16"
LEGACY_BIT_DEPTH = 16  # the same 16 as engines.data.images.DEFAULT_BIT_DEPTH, which cannot import this module


def parse_size(text: str) -> tuple[int, int]:
    """A model input size as `--size` takes it: '256' -> (256, 256); '256x320' -> (height 256, width 320). Here, not in
    training, so that tools without torch (bench) read it by the same rule."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not match:
        raise ValueError(f"--size {text!r}: expected N or HxW, e.g. 256 or 256x320")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if not (32 <= height <= 4096 and 32 <= width <= 4096):
        raise ValueError(f"--size {text!r}: expected each side between 32 and 4096 pixels")
    return height, width


def valid_bit_depth(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in BIT_DEPTHS


REQUIRED_KEYS = ("model_id", "method", "backbone", "input", "scorer_inputs", "graph", "files")

PIXELS = "pixels"
SCORE = "score"
ANOMALY_MAP = "anomaly_map"
OUTPUTS = (SCORE, ANOMALY_MAP)

# The feature graph, a second graph beside model.onnx: `pixels` -> `features` float32 [N, D, h, w], what the scorer is
# fitted on. `inspectd teach` runs it to refit scorer parameters on a station without torch. Optional: bundles written
# before it existed lack it until `inspectd export` rewrites them.
FEATURE_GRAPH = "features.onnx"
FEATURES = "features"

# Scorer inputs whose first dimension is a number of rows that a refit may change (the k-means references, the
# memory bank): the graph is exported with that dimension dynamic, and backends accept any row count there. Each
# with the recipe field that bounds it (a TensorRT plan's profile goes up to that).
ROW_LIMITS = {"references": "k", "memory_bank": "memory_size"}
VARIABLE_ROWS = tuple(ROW_LIMITS)

# A bundle written before recipes were recorded aggregated 15x15 in its memory scorer and nowhere else.
LEGACY_MEMORY_AGGREGATION = 15


def aggregation_of(architecture: dict) -> int:
    """The patch-aggregation window of a manifest's architecture (older bundles: what their scorer did)."""
    if "aggregation" in architecture:
        return int(architecture["aggregation"])
    return LEGACY_MEMORY_AGGREGATION if architecture.get("scorer") == "memory" else 1


# Scorers whose image score is their own (engines.model.graph: has_global_score), not a pooling of the map: their
# image and pixel thresholds are in different units and cannot be compared.
OWN_IMAGE_SCORE = frozenset({"kmeans"})


def scores_pool_the_map(manifest: dict) -> bool:
    """Whether a bundle's image score pools its map (so it is at most the map's maximum)."""
    return manifest.get("architecture", {}).get("scorer") not in OWN_IMAGE_SCORE


def recipe_of(manifest: dict) -> dict:
    """The recipe a bundle was trained with: the manifest's own record, or for a bundle written before recipes were
    recorded, the same fields read back from its architecture and training sections."""
    if "recipe" in manifest:
        # Fields added to recipes later read back as what bundles did before them.
        return {"score_share": 0.0, "augment": "none", **manifest["recipe"]}
    architecture = manifest.get("architecture", {})
    training = manifest.get("training", {})
    shape = architecture.get("input_shape") or [manifest["input"]["height"], manifest["input"]["width"], 1]
    return {
        "name": "legacy",
        "method": manifest.get("method"),
        "backbone": manifest.get("backbone"),
        "taps": [2 ** (int(i) + 1) for i in architecture.get("taps", [])],
        "size": [int(shape[0]), int(shape[1])],
        "resize": manifest.get("input", {}).get("resize", "stretch"),
        "scorer": architecture.get("scorer"),
        "aggregation": aggregation_of(architecture),
        "memory_size": training.get("memory_size"),
        "k": training.get("k"),
        "smoothing_sigma": architecture.get("smoothing_sigma", 4.0),
        "score_share": architecture.get("score_share", 0.0),
        "augment": "none",
    }


def describe_augment(augment: str) -> str:
    """'rot180 copies', 'no copies': what a recipe's scorer is fitted on besides the images."""
    return "no copies" if augment == "none" else f"{augment} copies"


def describe_score_share(share: float) -> str:
    """'max', 'top 1%', 'mean': how an image score pools its map."""
    share = float(share)
    if share == 0.0:
        return "max"
    return "mean" if share == 1.0 else f"top {share * 100:g}%"


def describe_recipe(recipe: dict, memory_bank: int | None = None) -> str:
    """One line: 'patchcore: frozen lite0 taps 8+16 320x320 stretch, memory bank 16384, window 3, sigma 4, score
    top 1%' (and ', fitted with rot180 copies' when the recipe has copies). `memory_bank`: the patches the fitted
    bank holds (a manifest's training.memory_size), shown before the recipe's cap where it is less, 'memory bank 448
    (cap 16384)': a small set fills far less than the cap, which alone read as the bank's size."""
    scorer = recipe.get("scorer")
    if scorer == "memory":
        cap = recipe.get("memory_size")
        scorer = f"memory bank {cap}" if memory_bank in (None, cap) else f"memory bank {memory_bank} (cap {cap})"
    elif scorer in ("kmeans", "kmeans_local"):
        scorer = f"{scorer} k={recipe.get('k')}"
    size = recipe.get("size") or ["?", "?"]
    taps = "+".join(str(t) for t in recipe.get("taps", []))
    return (
        f"{recipe.get('name')}: {recipe.get('method')} {recipe.get('backbone')} taps {taps} {size[0]}x{size[1]} "
        f"{recipe.get('resize')}, {scorer}, window {recipe.get('aggregation')}, "
        f"sigma {recipe.get('smoothing_sigma'):g}, score {describe_score_share(recipe.get('score_share', 0.0))}"
        + ("" if recipe.get("augment", "none") == "none" else f", fitted with {describe_augment(recipe['augment'])}")
    )


def fitted_memory_bank(manifest: dict) -> int | None:
    """The patches a bundle's fitted memory bank holds, where its manifest records them beside a recorded recipe (a
    bundle written before recipes were recorded has only that count, which recipe_of already reads as its size)."""
    training = manifest.get("training")
    size = training.get("memory_size") if "recipe" in manifest and isinstance(training, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def inspectd_version() -> str:
    """The installed inspectd's version, recorded in what it writes (bundle manifests, thresholds provenance)."""
    try:
        from importlib.metadata import version

        return version("inspectd")
    except Exception:  # noqa: BLE001 - a source checkout without package metadata still writes bundles
        return "unknown"
