"""rdcd.validate: copy-detection evaluation (ISC2021 metrics), runtime runners, the INT8 gate and the
latency bench. The runners (:mod:`rdcd.validate.runtimes`) and the bench never import torch.

The gate as a library call (what ``rdcd-validate gate`` runs)::

    from rdcd.validate import GateConfig, gate

    report = gate("runs/demo/bench", "runs/demo/export", GateConfig(max_drop=0.005, report="runs/demo/report"))
"""

__all__ = ["GateConfig", "gate"]


def __getattr__(name: str):  # lazily: importing rdcd.validate.runtimes must stay light
    if name in __all__:
        from rdcd.validate import int8_gate as _gate

        return getattr(_gate, name)
    raise AttributeError(f"module 'rdcd.validate' has no attribute {name!r}")
