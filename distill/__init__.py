"""RDCD training (``rdcd-distill``): relational self-supervised distillation from a frozen SSCD teacher.

Modules: ``augment`` (SSCD "advanced" views: PIL stage + batched kornia stage), ``losses`` (RSD,
MoCo InfoNCE, hard negatives; SSCD InfoNCE + entropy for the baseline), ``queues`` (FIFO feature
queues), ``data`` (image scan, views, deterministic distributed batches), ``cache`` (teacher-feature
cache), ``dist`` (torchrun plumbing), ``config`` (:class:`TrainConfig`: every setting, its default and
bounds, once), ``objectives`` (the loss of each mode), ``head_stage`` (feature cache + head stage,
``heads``), ``evaluation``, ``progress``, ``student_utils``, ``checkpoint``, ``train`` (the loop),
``cli`` (the command, generated from ``config``).
"""
