"""Evaluations during a run (on ``--eval-benchmark``) and the choice of the network to export.

An evaluation that fails does not cost the trained model: the run goes on without evaluations, writes
its model, then ends with one error line saying why (``tr.eval_error``)."""

from __future__ import annotations

import logging
import os

from torch import nn

from rdcd.errors import RdcdError

log = logging.getLogger("rdcd.distill")


def evaluate_student(student: nn.Module, bench: str | os.PathLike, device, batch_size: int = 64) -> dict:
    """µAP etc. of ``student`` on a DISC-layout benchmark (rdcd.validate.evaluate), in eval mode."""
    from rdcd.benchmark import load_benchmark
    from rdcd.model import TorchEmbedder
    from rdcd.validate.evaluate import describe, evaluate_descriptors

    modes = {m: m.training for m in student.modules()}  # restores frozen-BN layers too
    try:
        b = load_benchmark(bench)
        emb = TorchEmbedder(student, str(device))
        desc = describe(b, emb, student.config.preprocess(), batch_size, with_training=False, label="eval")
        res = evaluate_descriptors(b, desc)
        row = res.row()
        return {"micro_ap": round(row["micro_ap"], 5), "recall_at_p90": round(row["recall_at_p90"], 5),
                "acc_at_1": round(row["acc_at_1"], 5), "seconds": round(desc.seconds, 2)}
    finally:
        for m, training in modes.items():
            m.training = training


def evaluate(tr, net: nn.Module, label: str) -> dict | None:
    """An evaluation of ``net`` on --eval-benchmark, or None when it fails (or one failed before)."""
    if tr.eval_error is not None:
        return None
    try:
        return {"step": tr.step, "label": label, **evaluate_student(net, tr.cfg.eval_benchmark, tr.device)}
    except Exception as exc:  # noqa: BLE001 - a bad benchmark must not cost the trained model
        tr.eval_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RdcdError) else str(exc)
        log.warning("evaluation (%s) on %s failed, continuing without evaluations: %s", label,
                    tr.cfg.eval_benchmark, tr.eval_error)
        return None


def record_eval(tr, label: str) -> None:
    """Evaluate the student (rank 0), keep and log the result; every rank waits for it."""
    if not tr.cfg.eval_benchmark:
        return
    if tr.ctx.is_main:
        res = evaluate(tr, tr.student, label)
        if res is not None:
            tr.evals.append(res)
            tr._log({"step": tr.step, "eval": res})
            log.info("eval at step %d (%s): micro-AP %.4f", tr.step, label, res["micro_ap"])
    tr.ctx.barrier()


def choose_encoder(tr) -> nn.Module:
    """The network to export: the student, or the momentum encoder (an EMA of it) with ``always``, or
    with ``auto`` when it scores higher on the evaluation benchmark (choose on a validation benchmark,
    not on the one you report). Sets ``tr.exported``."""
    cfg = tr.cfg
    tr.exported = "student"
    if tr.momentum is None or cfg.export_momentum == "never" or tr.step == 0:
        return tr.student
    if cfg.export_momentum == "auto":
        if not (cfg.eval_benchmark and tr.evals and tr.evals[-1]["step"] == tr.step):
            return tr.student
        res = evaluate(tr, tr.momentum, "final, momentum encoder")
        if res is None:
            return tr.student
        student = tr.evals[-1]
        log.info("momentum encoder: micro-AP %.4f (student %.4f)", res["micro_ap"], student["micro_ap"])
        if res["micro_ap"] <= student["micro_ap"]:
            tr.evals.insert(len(tr.evals) - 1, res)  # the last entry stays the exported network's
            return tr.student
        tr.evals.append(res)
    tr.exported = "momentum encoder"
    return tr.momentum


def describe(tr, final: bool = False) -> dict:
    """What ``train_config.json`` (and, with ``final``, ``config.json``) records about the run."""
    import timm
    import torch

    import rdcd

    cfg, ctx = tr.cfg, tr.ctx
    d = {"training": {**cfg.to_dict(), "teacher_size": cfg.t_size if cfg.mode == "rdcd" else None,
                      "view_size": cfg.view_size, "canvas": cfg.canvas_size, "peak_lr": tr.peak_lr,
                      "total_steps": tr.total_steps, "warmup_steps": tr.warmup, "steps_per_epoch": tr.spe,
                      "amp": tr.amp, "bn_detail": "frozen: eval mode, ImageNet running statistics kept" if cfg.bn == "frozen" else
                      "train: per-process batch statistics, running statistics updated; shuffle-BN on the "
                      "momentum encoder across processes",
                      "optimizer": "SGD", "schedule": "linear warm-up + cosine"},
         "teacher": tr.teacher.describe() if tr.teacher is not None else None,
         "pretrained": tr.pretrained_check,
         "data": {"train_dir": cfg.train_dir, "images": tr.n_images,
                  "excluded_benchmark": cfg.exclude_benchmark},
         "distributed": {"world_size": ctx.world, "backend": ctx.backend, "device": str(tr.device),
                         "threads": torch.get_num_threads()},
         "versions": {"rdcd": getattr(rdcd, "__version__", "?"), "torch": torch.__version__, "timm": timm.__version__}}
    if tr.heads_result:
        d["heads"] = tr.heads_result
    if tr.cache is not None:
        d["teacher_cache"] = {"dir": str(tr.cache.dir), "views": cfg.cache_views, "build": tr.cache_rate}
    if final:
        d["result"] = {**tr.results, "eval": tr.evals, "exported": getattr(tr, "exported", "student")}
    return d
