"""The model bundle on disk (docs/ARCHITECTURE.md), the bottom layer every other part reads it through.

    format      file names, graph input and output names: the constants the rest spells nothing out without
    store       write_bundle, load_bundle (every checksum verified), Bundle
    thresholds  the thresholds document (thresholds.json): versions, provenance, history
    plans       TensorRT plans stored in a bundle: names, JSON sidecars, whether this station may load one

Imports nothing of the project but engines.errors; needs neither torch nor onnx.
"""
