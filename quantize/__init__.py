"""rdcd.quantize: INT8 for every export target, calibrated on real images, judged by µAP.

The API (:mod:`~rdcd.quantize.api`, also behind ``rdcd-quantize`` and ``rdcd-export --int8``)::

    from rdcd.quantize import AccuracyControl, QuantizeRecipe, quantize

    result = quantize("runs/demo/export", "calib/", targets=["onnx", "openvino"],
                      accuracy=AccuracyControl("runs/demo/bench", max_drop=0.005))
    result.artifacts  # the INT8 manifest rows; result.report: fallback steps, codes, latency

* :mod:`~rdcd.quantize.calib` - calibration images (a folder, counted in images, never random scales)
* :mod:`~rdcd.quantize.onnx_ptq` - static PTQ to explicit QDQ ONNX (ONNX Runtime or NNCF);
  :mod:`~rdcd.quantize.qdq_graph` - the ONNX graph facts it needs (layers, float nodes, QDQ checks)
* :mod:`~rdcd.quantize.openvino_ptq` - OpenVINO INT8 via NNCF
* :mod:`~rdcd.quantize.coreml_ptq` - Core ML W8A8 (coremltools.optimize.torch) and W8 (coremltools.optimize.coreml)
* :mod:`~rdcd.quantize.target_onnx`, :mod:`~rdcd.quantize.target_openvino`, :mod:`~rdcd.quantize.target_coreml` -
  one job per target (manifest rows, fallback, accuracy), sharing a :class:`~rdcd.quantize.context.Context`
* :mod:`~rdcd.quantize.sensitivity` - per-layer SQNR and the µAP-driven fallback loop
* :mod:`~rdcd.quantize.codes` - int8 / binary descriptor codes for the reference index

Layers are named by their PyTorch module (``backbone.blocks.6.0.conv_dw``, ``fc``, ``projector``): the ONNX
exporter names every weight ``student.<module>.weight``, so one name addresses the same layer in ONNX,
OpenVINO and PyTorch.
"""

__all__ = ["AccuracyControl", "QuantizeRecipe", "QuantizeResult", "quantize"]


def __getattr__(name: str):  # the API without importing it for rdcd.quantize.codes (rdcd-index, no torch)
    if name in __all__:
        from rdcd.quantize import api

        return getattr(api, name)
    raise AttributeError(f"module 'rdcd.quantize' has no attribute {name!r}")
