"""rdcd.export: ONNX, Core ML, TensorRT and OpenVINO artifacts described in ``manifest.json``.

The API (what ``rdcd-export`` runs)::

    from rdcd.export import Options, export

    result = export("runs/demo/run", targets=["onnx", "openvino"], out="exports/s128", options=Options(threads=2))
"""

__all__ = ["Options", "export"]


def __getattr__(name: str):  # lazily: torch is imported only when something is exported
    if name in __all__:
        from rdcd.export import api

        return getattr(api, name)
    raise AttributeError(f"module 'rdcd.export' has no attribute {name!r}")
