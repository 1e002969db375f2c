"""RDCD training (``rdcd-distill``): relational self-supervised distillation from a frozen SSCD teacher.

Modules: ``augment`` (SSCD "advanced" views: PIL stage + batched kornia stage), ``losses`` (RSD,
MoCo InfoNCE, hard negatives; SSCD InfoNCE + entropy for the baseline), ``queues`` (FIFO feature
queues), ``data`` (image scan, views, deterministic distributed batches), ``cache`` (teacher-feature
cache), ``dist`` (torchrun plumbing), ``config`` (:class:`TrainConfig`: every setting, its default and
bounds, once), ``objectives`` (the loss of each mode), ``head_stage`` (feature cache + head stage,
``heads``), ``evaluation``, ``progress``, ``student_utils``, ``checkpoint``, ``train`` (the loop),
``cli`` (the command, generated from ``config``).

The API (what ``rdcd-distill`` and ``rdcd-demo`` run; ``distill`` is :func:`rdcd.distill.train.train`)::

    from rdcd.distill import distill, from_options

    result = distill(from_options({"train_dir": "images/", "out": "runs/s128", "dim": 128, "head_steps": 1500}))
"""

__all__ = ["TrainConfig", "distill", "from_options"]
#: name -> (module, attribute): imported on first use, so that importing rdcd.distill loads no torch
_HOME = {"TrainConfig": ("config", "TrainConfig"), "from_options": ("config", "from_options"),
         "distill": ("train", "train")}


def __getattr__(name: str):
    if name in _HOME:
        import importlib

        module, attr = _HOME[name]
        return getattr(importlib.import_module(f"rdcd.distill.{module}"), attr)
    raise AttributeError(f"module 'rdcd.distill' has no attribute {name!r}")
