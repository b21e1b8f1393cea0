"""The FP16 variant of a bundle's ONNX graph: backbone and head in float16, scorer and map post-processing in float32.

TensorRT 11 builds only strongly typed networks (no FP16 builder flag), so reduced precision has to be written into
the graph itself. This module rewrites the exported FP32 graph rather than re-exporting from torch, so any bundle's
model.onnx can be converted without the training stack's torch graph and the two variants cannot drift apart.

Which nodes become float16 is decided from the data flow and the operator, not from node names:
- the *feature region* holds the nodes whose value derives from the `pixels` input and from none of the scorer
  inputs (Shape/Size stop the walk: shape arithmetic stays as exported), whose operator is one a CNN backbone is
  made of (FP16_OPS), and whose pixel-derived inputs all come from the region. Reductions that can overflow or lose
  the result in float16 (ReduceL2/ReduceSum, MatMul, Pow, Sqrt, Softmax, ...) are not FP16_OPS, so the nearest-
  reference scorer's L2 normalisation of the features, which depends on no scorer input, still runs in float32;
- float32 tensors produced there become float16, Casts to float32 there cast to float16 instead, float32 constants
  and initializers they read get float16 copies;
- where a float16 tensor leaves the region (the features entering the scorer) a Cast back to float32 is inserted.
The scorer (Mahalanobis distance or nearest reference), upsampling, smoothing and the image score therefore run in
float32, and the graph's inputs and outputs keep their types (uint8 pixels, float32 parameters, score and map).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from engines.errors import BundleError

FLOAT = 1  # onnx.TensorProto.FLOAT
FLOAT16 = 10  # onnx.TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# Nodes through which "derives from the pixels" does not flow: their outputs describe a tensor's shape, not its data.
SHAPE_OPS = {"Shape", "Size"}
# Inputs that the ONNX operator schema types as float32 whatever the data type is (Resize-13 roi/scales, Upsample).
FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
# Control flow carries subgraphs this rewrite does not descend into.
UNSUPPORTED_OPS = {"If", "Loop", "Scan"}
# What a convolutional backbone and its head are made of, and safe in float16: element-wise maths with bounded
# activations, convolutions and pooling (TensorRT and cuDNN accumulate them in float32), data movement.
FP16_OPS = {
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Erf",
    "Mul",
    "Add",
    "Sub",
    "Div",
    "Neg",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Pad",
    "Resize",
    "Upsample",
    "Concat",
    "Transpose",
    "Cast",
    "Expand",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Split",
    "Identity",
}


def feature_region(model, pixel_input: str, scorer_inputs: tuple[str, ...]) -> list[int]:
    """Indices of the nodes of `model.graph` that make up the feature region (see the module docstring)."""
    nodes = model.graph.node
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(index)
        for name in node.output:
            producer[name] = index

    def reach(sources, stop_ops=frozenset()) -> set[int]:
        seen: set[int] = set()
        queue = deque(i for s in sources for i in consumers.get(s, ()))
        while queue:
            index = queue.popleft()
            if index in seen:
                continue
            seen.add(index)
            if nodes[index].op_type in stop_ops:
                continue
            queue.extend(i for out in nodes[index].output for i in consumers.get(out, ()))
        return seen

    from_pixels = reach([pixel_input], SHAPE_OPS)
    from_scorer = reach(scorer_inputs)
    data = {i for i in from_pixels if nodes[i].op_type not in SHAPE_OPS}
    region = {i for i in data - from_scorer if nodes[i].op_type in FP16_OPS}
    # Closure: a node whose pixel-derived input is computed outside the region (in float32) stays outside too.
    changed = True
    while changed:
        changed = False
        for i in sorted(region):
            if any(producer.get(name) in data and producer[name] not in region for name in nodes[i].input):
                region.discard(i)
                changed = True
    return sorted(region)


def infer_types(model, what: str):
    """`model` with its value types inferred (strictly) and checked; BundleError in one line if they do not fit."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BundleError(f"{what}: the ONNX graph does not type-check ({str(exc).strip().splitlines()[0]})") from exc
    return model


def to_fp16_variant(model, pixel_input: str = "pixels", scorer_inputs: tuple[str, ...] = ()):
    """A new ModelProto: `model` with its feature region in float16 (see the module docstring)."""
    from onnx import helper, numpy_helper

    graph_inputs = {i.name for i in model.graph.input}
    missing = [n for n in (pixel_input, *scorer_inputs) if n not in graph_inputs]
    if missing:
        raise BundleError(
            f"FP16 variant: graph inputs {', '.join(missing)} missing, expected {pixel_input!r} and the "
            f"scorer inputs {', '.join(scorer_inputs) or '(none)'}"
        )
    model = infer_types(model, "FP16 variant (source graph)")
    graph = model.graph
    elem_type = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    initializers = {t.name: t for t in graph.initializer}
    constants = {
        node.output[0]: node
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }
    for t in graph.initializer:
        elem_type.setdefault(t.name, t.data_type)
    for name, node in constants.items():
        elem_type.setdefault(name, node.attribute[0].t.data_type)

    region = feature_region(model, pixel_input, scorer_inputs)
    region_set = set(region)
    for index in region:
        if graph.node[index].op_type in UNSUPPORTED_OPS:
            raise BundleError(
                f"FP16 variant: node {graph.node[index].name!r} is {graph.node[index].op_type}, "
                "expected a graph without control flow in the backbone"
            )
    half = {out for i in region for out in graph.node[i].output if elem_type.get(out) == FLOAT}

    new_initializers = []
    fp16_copy: dict[str, str] = {}  # float32 constant/initializer name -> its float16 copy
    input_casts = []  # Casts float32 -> float16 for float32 activations entering the region

    def as_half(name: str) -> str:
        if name in fp16_copy:
            return fp16_copy[name]
        copy = f"{name}__fp16"
        if name in initializers or name in constants:
            array = (
                numpy_helper.to_array(initializers[name])
                if name in initializers
                else numpy_helper.to_array(constants[name].attribute[0].t)
            )
            # Saturate rather than overflow to inf: an out-of-range weight would otherwise poison every feature.
            clipped = np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)
            new_initializers.append(numpy_helper.from_array(clipped, copy))
        else:
            input_casts.append(helper.make_node("Cast", [name], [copy], to=FLOAT16, name=f"{copy}/Cast"))
        fp16_copy[name] = copy
        return copy

    for index in region:
        node = graph.node[index]
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == FLOAT:
                to.i = FLOAT16
        for slot, name in enumerate(node.input):
            if not name or name in half or elem_type.get(name) != FLOAT:
                continue
            if (node.op_type, slot) in FLOAT32_INPUTS:
                continue
            node.input[slot] = as_half(name)

    # Back to float32 wherever a float16 tensor is read outside the region (Shape reads any type: left alone).
    output_casts = []
    fp32_copy: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        if index in region_set or node.op_type in SHAPE_OPS:
            continue
        for slot, name in enumerate(node.input):
            if name in half:
                if name not in fp32_copy:
                    fp32_copy[name] = f"{name}__fp32"
                    output_casts.append(
                        helper.make_node("Cast", [name], [fp32_copy[name]], to=FLOAT, name=f"{name}__fp32/Cast")
                    )
                node.input[slot] = fp32_copy[name]
    for output in graph.output:
        if output.name in half:
            raise BundleError(
                f"FP16 variant: graph output {output.name!r} comes straight from the backbone, "
                "expected outputs computed by the float32 scorer"
            )

    # Rebuild the node list in a valid topological order: every added Cast right after the producer of what it
    # reads (or first, when that is a graph input).
    after: dict[str, list] = {}
    for cast in (*input_casts, *output_casts):
        after.setdefault(cast.input[0], []).append(cast)
    ordered = [cast for name in graph_inputs for cast in after.get(name, ())]
    for node in graph.node:
        ordered.append(node)
        for out in node.output:
            ordered.extend(after.get(out, ()))
    # Constants whose every reader now reads a float16 copy are dropped with the unused initializers.
    used = {name for node in ordered for name in node.input} | {o.name for o in graph.output}
    ordered = [node for node in ordered if node.op_type != "Constant" or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(ordered)

    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Stale float32 annotations would contradict the new types; let inference redo them.
    del graph.value_info[:]
    return infer_types(model, "FP16 variant")


def write_fp16_variant(
    source: str | Path, destination: str | Path, pixel_input: str = "pixels", scorer_inputs: tuple[str, ...] = ()
) -> Path:
    """Read the FP32 graph at `source`, write its FP16 variant to `destination`."""
    import onnx

    try:
        model = onnx.load(str(source))
    except Exception as exc:  # onnx raises DecodeError, OSError, ... depending on what is wrong with the file
        raise BundleError(f"{source}: cannot read as an ONNX model ({exc})") from exc
    variant = to_fp16_variant(model, pixel_input, scorer_inputs)
    destination = Path(destination)
    onnx.save(variant, str(destination))
    return destination
