"""Checkpoints of a training run: what they hold, writing them safely, resuming and extending runs, and
stopping on SIGINT / SIGTERM with the current step saved.

``checkpoint.pt`` (rank 0, atomic) holds the step, the config, the student, the momentum encoder,
the optimizer and AMP scaler, the queues, the RNG states and the evaluations so far. It is written
every ``ckpt_every`` steps, at the last step and when a signal stops the run; a write that fails
(a full disk) leaves the previous checkpoint and no temporary behind.

A run folder is in one of three states: new (no checkpoint), interrupted (a checkpoint, no final
``model.safetensors``: ``--resume`` continues it) or finished (both). A finished run rerun with a
larger ``--max-steps`` (or ``--epochs``) continues from its checkpoint; with the same or a smaller
one there is nothing to do (:class:`AlreadyDone`, exit 0).
"""

from __future__ import annotations

import io
import json
import logging
import random
import signal
import threading
from pathlib import Path

import torch

from rdcd import cli
from rdcd.distill.config import RESUMABLE_CHANGES
from rdcd.errors import Interrupted, RdcdError
from rdcd.fsutil import atomic_path, write_text

log = logging.getLogger("rdcd.distill")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL_WEIGHTS = "model.safetensors"  # rdcd.model.WEIGHTS_NAME


class AlreadyDone(Exception):
    """The run in ``--out`` is finished at (or past) the requested length: nothing to do (exit 0)."""

    def __init__(self, out: Path, step: int, total: int):
        self.out, self.step, self.total = out, step, total
        super().__init__(f"{out} is already trained to step {step} (this run: {total} steps): nothing to do; "
                         "pass a larger --max-steps to continue it")


# ------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # different GPU count: the data order does not depend on it
            pass


# ------------------------------------------------------------------------------------ files
def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state (tensors only: ``weights_only``); a damaged file is one clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise RdcdError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def write_checkpoint(path: Path, state: dict, step: int, previous: int | None = None) -> None:
    """Serialise in memory, then write atomically: a full disk fails as an ``OSError`` of the write (torch's
    own file writer reports it as a bare RuntimeError), and leaves the previous checkpoint (of step
    ``previous``, when one was written or loaded) untouched."""
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(buf.getbuffer())
    except OSError as exc:
        kept = f"the previous checkpoint (step {previous}) is intact" if previous is not None and path.exists() \
            else "no checkpoint was kept"
        if cli.is_disk_full(exc):
            raise RdcdError(f"disk full while writing the checkpoint of step {step} to {path}: free space and run "
                            f"again with --resume ({kept})") from None
        raise RdcdError(f"cannot write the checkpoint {path}: {exc.strerror or exc} ({kept})") from None


def trim_metrics(out: Path, step: int) -> None:
    """Drop the log lines of steps a checkpoint does not contain (logged after it, before a kill)."""
    path = out / METRICS
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
    write_text(path, "".join(k + "\n" for k in keep))


# ------------------------------------------------------------------------------------ run folder
def prepare_out_dir(cfg, out: Path) -> dict | None:
    """The checkpoint state to continue from (``--resume``, or a finished run to extend), or None for a
    new run. Refuses a folder holding another run, or one whose settings differ."""
    ckpt = out / CHECKPOINT
    finished = (out / FINAL_WEIGHTS).exists()
    if not ckpt.exists():
        if cfg.resume:
            raise RdcdError(f"--resume: no {CHECKPOINT} in {out} (nothing to resume)")
        if finished:
            raise RdcdError(f"{out} already holds a finished run (without {CHECKPOINT}, so it cannot be "
                            "continued): choose another --out")
        return None
    state = read_checkpoint(ckpt)
    step = int(state.get("step", 0))
    if not cfg.resume and not finished:
        raise RdcdError(f"{out} already holds an interrupted run (checkpoint at step {step}): pass --resume to "
                        "continue it, or choose another --out")
    try:
        saved = json.loads(state["config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise RdcdError(f"checkpoint {ckpt} records no readable config: not an rdcd-distill checkpoint") from None
    now = cfg.to_dict()
    diffs = [k for k, v in now.items() if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
    if diffs:
        what = "--resume" if cfg.resume else f"{out} holds a run with other settings"
        raise RdcdError(f"{what}: these settings differ from the checkpoint's: " + ", ".join(
            f"{k} ({saved[k]!r} there, {now[k]!r} now)" for k in diffs) + ("" if cfg.resume else
                                                                          "; choose another --out"))
    state["finished"] = finished
    return state


def check_length(out: Path, state: dict, total: int) -> None:
    """A finished run at or past ``total`` steps: :class:`AlreadyDone`; an interrupted one past it: refused."""
    step = int(state["step"])
    if state.get("finished"):
        if step >= total:
            raise AlreadyDone(out, step, total)
        log.info("extending the finished run in %s from step %d to %d (the cosine schedule now spans %d steps)",
                 out, step, total, total)
    elif step > total:
        raise RdcdError(f"--resume: the checkpoint in {out} is at step {step}, past this run's {total} steps "
                        "(raise --max-steps / --epochs)")


# ------------------------------------------------------------------------------------ trainer state
def trainer_state(tr) -> dict:
    """Everything :func:`load_trainer_state` needs to continue exactly after ``tr.step``."""
    state = {"step": tr.step, "config": json.dumps(tr.cfg.to_dict()),
             "student": {k: v.detach().cpu() for k, v in tr.student.state_dict().items()},
             "optimizer": tr.optimizer.state_dict(), "rng": rng_state(),
             "results": json.dumps({"evals": tr.evals, "cache": tr.cache_rate, "heads": tr.heads_result})}
    if tr.momentum is not None:
        state["momentum"] = {k: v.detach().cpu() for k, v in tr.momentum.state_dict().items()}
        state["queues"] = {"moco": tr.moco_queue.state_dict(), "rsd": tr.rsd_queue.state_dict()}
    if tr.scaler is not None:
        state["scaler"] = tr.scaler.state_dict()
    return state


def load_trainer_state(tr, state: dict) -> None:
    tr.student.load_state_dict(state["student"])
    tr.optimizer.load_state_dict(state["optimizer"])
    if tr.momentum is not None:
        tr.momentum.load_state_dict(state["momentum"])
        tr.moco_queue.load_state_dict(state["queues"]["moco"])
        tr.rsd_queue.load_state_dict(state["queues"]["rsd"])
    if tr.scaler is not None and "scaler" in state:
        tr.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    tr.step = tr.saved_step = int(state["step"])
    prev = json.loads(state.get("results", "{}"))
    tr.evals = prev.get("evals", [])
    tr.cache_rate = prev.get("cache")
    tr.heads_result = prev.get("heads")
    if tr.ctx.is_main:
        trim_metrics(tr.out, tr.step)
    log.info("resumed from %s at step %d", tr.out / CHECKPOINT, tr.step)


# ------------------------------------------------------------------------------------ signals
class StopOnSignal:
    """During the training loop, SIGINT / SIGTERM ask to stop: the step under way finishes, a checkpoint of
    it is written, then :class:`Interrupted` (exit 130 / 143). A second signal stops at once (the last
    checkpoint written stays). Under torchrun every rank learns of a request on any rank."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        log.warning("%s: stopping after this step and saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def requested(self) -> int | None:
        """The signal to stop for, agreed by every process (one all-reduce per step under torchrun)."""
        if not self.ctx.distributed:
            return self.signum
        flag = torch.tensor([1.0 if self.signum else 0.0], device=self.ctx.device)
        if float(self.ctx.mean(flag)[0]) > 0:
            return self.signum or signal.SIGTERM
        return None

    def stop(self, trainer, signum: int) -> None:
        """Save the current step (unless just saved) and raise :class:`Interrupted`."""
        if trainer.saved_step != trainer.step:
            trainer.save_checkpoint()
        log.info("interrupted at step %d of %d: checkpoint %s written; run the same command with --resume to "
                 "continue", trainer.step, trainer.total_steps, trainer.out / CHECKPOINT)
        raise Interrupted(signum)
