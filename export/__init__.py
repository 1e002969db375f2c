"""rdcd.export: ONNX, Core ML, TensorRT and OpenVINO artifacts described in ``manifest.json``."""
