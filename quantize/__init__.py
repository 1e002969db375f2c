"""rdcd.quantize: INT8 for every export target, calibrated on real images, judged by µAP.

* :mod:`~rdcd.quantize.calib` - calibration images (a folder, counted in images, never random scales)
* :mod:`~rdcd.quantize.onnx_ptq` - static PTQ to explicit QDQ ONNX (ONNX Runtime or NNCF); the ONNX Runtime
  CPU model and the TensorRT INT8 input
* :mod:`~rdcd.quantize.openvino_ptq` - OpenVINO INT8 via NNCF
* :mod:`~rdcd.quantize.coreml_ptq` - Core ML W8A8 (coremltools.optimize.torch) and W8 (coremltools.optimize.coreml)
* :mod:`~rdcd.quantize.sensitivity` - per-layer SQNR and the µAP-driven fallback loop
* :mod:`~rdcd.quantize.codes` - int8 / binary descriptor codes for the reference index
* :mod:`~rdcd.quantize.api` - ``quantize_export`` (used by ``rdcd-export --int8``); :mod:`~rdcd.quantize.cli`

Layers are named by their PyTorch module (``backbone.blocks.6.0.conv_dw``, ``fc``, ``projector``): the ONNX
exporter names every weight ``student.<module>.weight``, so one name addresses the same layer in ONNX,
OpenVINO and PyTorch.
"""
