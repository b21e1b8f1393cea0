"""ONNX export of an inference graph, and `inspectd export BUNDLE`, which (re)writes a bundle's model.onnx and its
feature graph (features.onnx: pixels -> the features the scorer is fitted on, for `inspectd teach`).

The exported graph takes `pixels` uint8 [N, H, W, C] (N dynamic) then the scorer parameters by name, and gives
`score` float32 [N] and `anomaly_map` float32 [N, H, W].

Exporter: the TorchScript one (dynamo=False). It exports the graph over an order of magnitude faster than the dynamo
exporter, which also needs a wrapper with named arguments, since its dynamic_shapes cannot describe *scorer_params;
both match torch to ~1e-6 relative in ONNX Runtime. If a later torch drops dynamo=False, that wrapper plus
dynamic_shapes={"pixels": {0: Dim("batch")}} is the way over.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from engines.bundle.format import (
    ANOMALY_MAP,
    FEATURE_GRAPH,
    FEATURES,
    GRAPH,
    MANIFEST,
    PIXELS,
    SCORE,
    VARIABLE_ROWS,
    WEIGHTS,
)
from engines.bundle.store import Bundle, load_bundle
from engines.errors import BundleError, one_line
from engines.model.graph import InferenceGraph, build_graph, load_state_arrays

DEFAULT_OPSET = 17
MIN_OPSET = 17
# The TorchScript exporter's last opset (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET): past it the
# export fails only at its end, after a whole training run.
MAX_OPSET = 20


def check_opset(opset: int) -> None:
    """ValueError in one line unless this torch can export `opset`: train calls it before it trains."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset}: expected {MIN_OPSET} to {MAX_OPSET} (what the ONNX export supports)")


def export_graph(graph: InferenceGraph, scorer_params: dict[str, np.ndarray], opset: int = DEFAULT_OPSET) -> bytes:
    """The ONNX model of `graph` as bytes; `scorer_params` only give the example shapes (the first dimension of a
    VARIABLE_ROWS input, the number of k-means references, is exported dynamic: a refit may change it)."""
    check_opset(opset)
    graph = graph.eval()
    height, width, channels = graph.input_shape
    example_pixels = torch.zeros((2, height, width, channels), dtype=torch.uint8)
    names = list(graph.scorer_inputs)
    params = tuple(torch.from_numpy(np.ascontiguousarray(scorer_params[n], dtype=np.float32)) for n in names)
    dynamic_axes = {PIXELS: {0: "batch"}, SCORE: {0: "batch"}, ANOMALY_MAP: {0: "batch"}}
    for name in names:
        if name in VARIABLE_ROWS:
            dynamic_axes[name] = {0: name}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        # The TorchScript exporter warns about its own deprecation and about traced shape arithmetic in timm; both
        # are expected here and would only bury real problems in the training log.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example_pixels, *params),
            buffer,
            input_names=[PIXELS, *names],
            output_names=[SCORE, ANOMALY_MAP],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


class _Embed(torch.nn.Module):
    def __init__(self, graph: InferenceGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.graph.embed(pixels)


def export_feature_graph(graph: InferenceGraph, opset: int = DEFAULT_OPSET) -> bytes:
    """The feature graph (format.FEATURE_GRAPH) of `graph` as ONNX bytes: `pixels` -> `features` [N, D, h, w], the
    graph's own preprocessing, backbone, head and aggregation, so features computed on a station are the ones
    training fits the scorer on."""
    check_opset(opset)
    graph = graph.eval()
    height, width, channels = graph.input_shape
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # as in export_graph
        # In eval mode like the graph: the export puts its module back in the mode it had, and a new Module is in
        # training mode, which would set the graph's BatchNorm to batch statistics for whoever scores with it next.
        torch.onnx.export(
            _Embed(graph).eval(),
            (torch.zeros((2, height, width, channels), dtype=torch.uint8),),
            buffer,
            input_names=[PIXELS],
            output_names=[FEATURES],
            dynamic_axes={PIXELS: {0: "batch"}, FEATURES: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def add_feature_graph(bundle: Bundle, graph: InferenceGraph, opset: int = DEFAULT_OPSET) -> None:
    """Write (or rewrite) the bundle's feature graph from `graph`, the torch graph of that same bundle."""
    bundle.replace_file(FEATURE_GRAPH, export_feature_graph(graph, opset), add=True)


def graph_from_bundle(bundle: Bundle) -> InferenceGraph:
    """Rebuild the torch graph of `bundle` from its manifest and weights.npz (no pickle, no ImageNet file needed)."""
    try:
        # No weights read yet: what fails here is the manifest's (a method's head setting of the wrong type or value,
        # which load does not check; load checks the rest).
        graph = build_graph(bundle.architecture, pretrained=False)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise BundleError(
            f"{bundle.path / MANIFEST}: architecture does not build a graph ({one_line(exc)}), expected what train "
            "recorded"
        ) from exc
    weights = bundle.weights()
    check_weights(weights, graph, bundle.path / WEIGHTS)
    try:
        load_state_arrays(graph, weights)
    except (KeyError, RuntimeError, ValueError) as exc:  # past check_weights: torch's own reasons, first line
        raise BundleError(
            f"{bundle.path / WEIGHTS}: does not fit the manifest's architecture ({one_line(exc)})"
        ) from exc
    return graph.eval()


def check_weights(arrays: dict[str, np.ndarray], graph: InferenceGraph, where: Path) -> None:
    """BundleError in one line naming `where` (weights.npz) and the first key that `graph` would not load as it is:
    torch's own refusal lists every key on lines after a bare header, and it casts complex (dropping the imaginary
    part), bool and integer arrays, and takes NaN, without a word."""
    expected = graph.state_dict()
    for key, tensor in expected.items():
        if key not in arrays:
            raise BundleError(f"{where}: {key} missing, expected the {len(expected)} tensors of the architecture")
        value = arrays[key]
        # torch loads a scalar from one element too, and the pretrained files store BatchNorm's counters that way.
        if tuple(value.shape) != tuple(tensor.shape) and not (tensor.dim() == 0 and tuple(value.shape) == (1,)):
            raise BundleError(f"{where}: {key} has shape {tuple(value.shape)}, expected {list(tensor.shape)}")
        if tensor.is_floating_point():
            if value.dtype not in (np.float16, np.float32, np.float64):  # torch takes no wider float
                raise BundleError(f"{where}: {key} has dtype {value.dtype}, expected float16, float32 or float64")
            if not np.isfinite(value).all():
                raise BundleError(f"{where}: {key} holds NaN or infinity, expected finite numbers")
            # A wider float would load as infinity past the graph's own range.
            if value.size and float(np.abs(value).max()) > torch.finfo(tensor.dtype).max:
                kind = str(tensor.dtype).removeprefix("torch.")
                raise BundleError(f"{where}: {key} holds numbers past {kind}'s range, expected finite numbers")
        elif value.dtype.kind not in "iu":  # a counter kept beside the weights (BatchNorm's num_batches_tracked)
            raise BundleError(f"{where}: {key} has dtype {value.dtype}, expected integers")
    unexpected = [key for key in arrays if key not in expected]
    if unexpected:
        raise BundleError(f"{where}: {unexpected[0]} is not a tensor of the architecture, expected only its tensors")


def export_bundle(path, opset: int = DEFAULT_OPSET) -> Bundle:
    bundle = load_bundle(path)
    graph = graph_from_bundle(bundle)
    bundle.replace_file(GRAPH, export_graph(graph, bundle.scorer_params(), opset))
    add_feature_graph(bundle, graph, opset)
    return bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory whose model.onnx to (re)write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({MIN_OPSET} to {MAX_OPSET})")


def run(args: argparse.Namespace) -> int:
    try:
        bundle = export_bundle(args.bundle, args.opset)
    except (BundleError, ValueError) as exc:
        print(f"inspectd export: {exc}", file=sys.stderr)
        return 2
    print(f"{bundle.graph_path} ({bundle.graph_path.stat().st_size / 1e6:.1f} MB, opset {args.opset})")
    return 0
