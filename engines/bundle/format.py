"""The bundle format's names, in one place: its files, the manifest's required keys, and the graph's inputs and
outputs that every backend, the exporter and the plan builder bind by name (docs/ARCHITECTURE.md).

The graph takes `pixels` uint8 [N, H, W, C] (N dynamic), then the scorer parameters in the manifest's
`scorer_inputs` order, and gives `score` float32 [N] and `anomaly_map` float32 [N, H, W].
"""

from __future__ import annotations

FORMAT = "inspectd-bundle"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
SCORER = "scorer.npz"
WEIGHTS = "weights.npz"
THRESHOLDS = "thresholds.json"
REQUIRED_FILES = (GRAPH, SCORER, WEIGHTS, THRESHOLDS)
REQUIRED_KEYS = ("model_id", "method", "backbone", "input", "scorer_inputs", "graph", "files")

PIXELS = "pixels"
SCORE = "score"
ANOMALY_MAP = "anomaly_map"
OUTPUTS = (SCORE, ANOMALY_MAP)

# Scorer inputs whose first dimension is a number of rows that a refit may change (the k-means references): the
# graph is exported with that dimension dynamic, and backends accept any row count there.
VARIABLE_ROWS = ("references",)


def inspectd_version() -> str:
    """The installed inspectd's version, recorded in what it writes (bundle manifests, thresholds provenance)."""
    try:
        from importlib.metadata import version

        return version("inspectd")
    except Exception:  # noqa: BLE001 - a source checkout without package metadata still writes bundles
        return "unknown"
