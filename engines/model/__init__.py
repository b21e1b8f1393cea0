"""The model: backbones, the inference graph and its scorers, training methods, ONNX export (torch), and what is
derived from an exported graph without torch: its FP16 variant (half_precision) and TensorRT plans (build_engine).

Imports engines.runtime, engines.bundle and engines.data; the daemon never imports this package."""
