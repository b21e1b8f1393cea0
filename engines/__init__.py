"""Model side of inspectd, in layers that import only downwards:

    errors     error types (imports nothing)
    schema     how settings are declared (backend options, inspectd's config files) and their one-line errors
               (imports nothing)
    bundle     the bundle on disk: format constants, writing and verified loading, thresholds, TensorRT plan files
    data       images in: decoding files, MVTec-layout folders, synthetic defects, the synthetic line
    runtime    running a bundle: the Engine interface, one module per backend, Predictor (frames in, results out)
    model      the torch side: backbones, graph, methods, ONNX export, the FP16 graph, TensorRT plan building
    training   train, evaluate, metrics

bundle and data import only errors; runtime imports bundle and schema; model imports runtime, bundle and data;
training imports the rest. Nothing here imports `inspectd` or `calibration` (tests/test_layering.py holds the whole
rule). A runtime-only station (no torch) needs only errors, schema, bundle, data and runtime.
"""
