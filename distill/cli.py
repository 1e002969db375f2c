"""``rdcd-distill``: train an RDCD student (or the contrastive-only baseline) from a frozen SSCD teacher.

Examples::

    rdcd-distill --train-dir ../shared/data/train-pool --exclude-benchmark runs/bench-pool \\
        --dim 128 --input-size 160 --teacher-size 224 --max-steps 1500 --cache runs/cache --out runs/rdcd-128
    torchrun --nproc-per-node 4 -m rdcd.distill.cli --recipe paper --train-dir DISC/train --out runs/paper
    rdcd-distill ... --out runs/rdcd-128 --resume          # continue after an interruption (Ctrl-C saves a checkpoint)
    rdcd-distill ... --out runs/rdcd-128 --max-steps 3000  # extend a finished run from its last checkpoint

Recipes set defaults that explicit flags override: ``small`` (default; CPU-sized queues of 2,048 keys and
4,096 teacher features, global batch 32) and ``paper`` (RDCD's: queues of 65,536, batch 256, 224 px,
100 epochs, 5 warm-up epochs, base lr 1.0 at batch 256).

Exit codes: 0 done (or nothing left to do), 1 training diverged (non-finite loss; the last good
checkpoint is kept), 2 bad usage or input (checked before any work; a full disk), 130 / 143 stopped
by SIGINT / SIGTERM after writing a checkpoint of the current step (continue with --resume).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Sequence

from rdcd import cli

RECIPES = {
    "small": {"batch_size": 32, "queue_size": 2048, "rsd_queue_size": 4096, "epochs": 100, "warmup_epochs": 5.0,
              "input_size": 224, "base_lr": 1.0},
    "paper": {"batch_size": 256, "queue_size": 65536, "rsd_queue_size": 65536, "epochs": 100, "warmup_epochs": 5.0,
              "input_size": 224, "base_lr": 1.0},
}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="rdcd-distill", description=__doc__.split("\n\n")[0],
                           epilog="See docs/reports/distill.md for a measured CPU run.",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train-dir", required=True, action="append",
                   help="folder of training images (unlabeled); repeat it to train on several folders")
    g.add_argument("--exclude-benchmark", metavar="BENCH", default=None, action="append",
                   help="leave out the images listed in BENCH/sources.csv (a benchmark built from the same folder)")
    g.add_argument("--max-images", type=cli.positive_int, default=None, metavar="N",
                   help="train on a fixed subset of N images (chosen by sha1 of the file names) of all --train-dir")
    g.add_argument("--workers", type=cli.nonnegative_int, default=2, help="data-loader processes per training process (default 2)")
    g.add_argument("--canvas", type=cli.positive_int, default=None,
                   help="size of the square canvas the PIL stage works on (default: the view size)")
    g.add_argument("--no-overlays", dest="overlays", action="store_false",
                   help="leave out the text and emoji overlays (they need AugLy)")
    g = p.add_argument_group("model")
    g.add_argument("--mode", choices=("rdcd", "baseline"), default="rdcd",
                   help="rdcd: RSD + MoCo + hard negatives from the teacher; baseline: SSCD InfoNCE + entropy only")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="small", help="defaults for the settings below")
    g.add_argument("--backbone", default="efficientnet_lite0",
                   help="efficientnet_lite0 (offline ImageNet init), efficientnet_b0, mobilenetv3_large_100, "
                        "fastvit_t12 or any timm model")
    g.add_argument("--dim", type=cli.positive_int, default=128, help="descriptor size (the paper: 64, 128, 256)")
    g.add_argument("--input-size", type=cli.positive_int, default=None, help="student input size (recipe: 224)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init")
    g.add_argument("--backbone-weights", metavar="FILE", default=None,
                   help="timm ImageNet checkpoint (.safetensors or .pth state dict) for backbones without offline "
                        "weights; checked on real photos before training")
    g.add_argument("--teacher", default="sscd-onnx",
                   help="sscd-onnx (default: SSCD int8 ONNX in ONNX Runtime) | PATH.pt (SSCD TorchScript) | "
                        "PATH.onnx | timm:NAME")
    g.add_argument("--teacher-size", type=cli.positive_int, default=None,
                   help="teacher input size; it sees the student's view at this size (default: --input-size)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.positive_int, default=None, help="global batch size across processes (recipe)")
    g.add_argument("--lr", type=cli.nonnegative_float, default=None, help="absolute peak learning rate (overrides --base-lr)")
    g.add_argument("--base-lr", type=cli.nonnegative_float, default=None, help="peak lr at batch 256, scaled linearly (recipe: 1.0)")
    g.add_argument("--sgd-momentum", type=cli.nonnegative_float, default=0.9)
    g.add_argument("--weight-decay", type=cli.nonnegative_float, default=1e-6)
    g.add_argument("--epochs", type=cli.positive_int, default=None, help="epochs (recipe: 100)")
    g.add_argument("--max-steps", type=cli.nonnegative_int, default=None,
                   help="stop after this many steps; the schedule then spans min(epochs, max-steps)")
    g.add_argument("--warmup-epochs", type=cli.nonnegative_float, default=None, help="linear warm-up (recipe: 5)")
    g.add_argument("--warmup-steps", type=cli.nonnegative_int, default=None, help="warm-up in steps (overrides --warmup-epochs)")
    g.add_argument("--clip-grad", type=cli.nonnegative_float, default=None, help="clip the gradient norm (default: off)")
    g.add_argument("--bn", choices=("train", "frozen"), default=None,
                   help="BatchNorm in the full steps: train (batch statistics; running statistics re-estimated on "
                        "the training views) or frozen (eval mode: ImageNet's running statistics kept). Default: "
                        "frozen when the head stage runs, else train")
    g.add_argument("--train-blocks", type=cli.nonnegative_int, default=None,
                   help="full steps fine-tune only the last N backbone stages and its head conv (default: all)")
    g.add_argument("--backbone-lr-mult", type=cli.nonnegative_float, default=1.0,
                   help="backbone lr = lr x this; the randomly initialised heads use the full lr (default 1)")
    g.add_argument("--freeze-bn", action="store_true", help="same as --bn frozen")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on with CUDA, off on CPU)")
    g.add_argument("--seed", type=cli.nonnegative_int, default=0)
    g = p.add_argument_group("losses")
    g.add_argument("--queue-size", type=cli.positive_int, default=None, help="MoCo key queue (recipe small 2048, paper 65536)")
    g.add_argument("--rsd-queue-size", type=cli.positive_int, default=None,
                   help="teacher-feature queue for RSD (recipe small 4096, paper 65536)")
    g.add_argument("--moco-momentum", type=cli.nonnegative_float, default=0.99)
    g.add_argument("--moco-temp", type=cli.nonnegative_float, default=0.07)
    g.add_argument("--rsd-temp", type=cli.nonnegative_float, default=0.04)
    g.add_argument("--rsd-weight", type=cli.nonnegative_float, default=1.0)
    g.add_argument("--moco-weight", type=cli.nonnegative_float, default=1.0)
    g.add_argument("--hn-weight", type=cli.nonnegative_float, default=5.0, help="hard-negative loss weight")
    g.add_argument("--hn-ramp-steps", type=cli.nonnegative_int, default=0,
                   help="ramp the hard-negative weight linearly from 0 over N steps (default 0: full weight at once)")
    g.add_argument("--moco-momentum-end", type=cli.nonnegative_float, default=None,
                   help="cosine schedule of the momentum encoder from --moco-momentum to this (default: constant)")
    g.add_argument("--feature-weight", type=cli.nonnegative_float, default=0.0,
                   help="+ weight x (1 - cosine) between the student's 512-d feature and the teacher's (default 0)")
    g.add_argument("--rsd-positive", action="store_true", help="the current teacher feature as the first RSD column")
    g = p.add_argument_group("head stage (rdcd: heads trained on cached features before the full steps)")
    g.add_argument("--head-steps", type=cli.nonnegative_int, default=0,
                   help="steps of head distillation on cached backbone + teacher features of --cache-views views per "
                        "image, the backbone frozen with its ImageNet BN statistics (default 0: off). Needs a "
                        "feature cache (--cache, default <out>/cache); the full steps then read the teacher's "
                        "features of those K fixed views too")
    g.add_argument("--head-mode", choices=("rdcd", "rdcd+feature", "feature", "contrastive"), default="rdcd",
                   help="head-stage losses (default rdcd: RSD + MoCo + ramped hard negatives; see rdcd.distill.heads)")
    g.add_argument("--head-init", choices=("pca", "pcaw", "random"), default="random",
                   help="random (default: measured best), or fc by ridge regression onto the teacher and the "
                        "projector by PCA (pcaw: whitened) of the fit")
    g.add_argument("--head-hn-weight", type=cli.nonnegative_float, default=1.0,
                   help="head-stage hard-negative weight (default 1: the paper's 5 collapsed the heads on mixed clip art "
                        "+ photos; see docs/reports/distill.md)")
    g.add_argument("--head-lr", type=cli.nonnegative_float, default=1e-3, help="head-stage AdamW learning rate (default 1e-3)")
    g.add_argument("--head-batch-size", type=cli.positive_int, default=256, help="head-stage batch (default 256)")
    g.add_argument("--infonce-temp", type=cli.nonnegative_float, default=0.05, help="baseline InfoNCE temperature")
    g.add_argument("--entropy-weight", type=cli.nonnegative_float, default=30.0, help="baseline entropy (KoLeo) weight")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default ./runs/<timestamp>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--ckpt-every", type=cli.positive_int, default=500, help="checkpoint every N steps (default 500)")
    g.add_argument("--cache", metavar="DIR", default=None,
                   help="teacher-feature cache folder (K fixed views per image; for a slow teacher on CPU)")
    g.add_argument("--cache-views", type=cli.positive_int, default=4, help="K, views per image in the cache (default 4)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: the local rank's GPU)")
    g.add_argument("--threads", type=cli.positive_int, default=None, help="torch / ONNX Runtime threads per process")
    g.add_argument("--eval-benchmark", metavar="BENCH", default=None, help="evaluate on this benchmark at the end")
    g.add_argument("--export-momentum", choices=("auto", "never", "always"), default="auto",
                   help="save the momentum encoder instead of the student: auto = when it scores higher on "
                        "--eval-benchmark (use a validation benchmark for that), never, always")
    g.add_argument("--eval-every", type=cli.nonnegative_int, default=0, help="also evaluate every N steps")
    g.add_argument("--eval-at-start", action="store_true", help="also evaluate the initial student")
    g.add_argument("--log-every", type=cli.positive_int, default=10, help="log a line every N steps when there is no progress bar")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="rich progress bar (default: when stderr is a terminal)")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(a: argparse.Namespace):
    from rdcd.distill.train import TrainConfig

    recipe = RECIPES[a.recipe]
    pick = lambda name: getattr(a, name) if getattr(a, name) is not None else recipe[name]  # noqa: E731
    out = a.out or f"runs/{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return TrainConfig(
        train_dir=a.train_dir[0] if len(a.train_dir) == 1 else a.train_dir, max_images=a.max_images, out=out, exclude_benchmark=(a.exclude_benchmark[0] if a.exclude_benchmark and len(a.exclude_benchmark) == 1
                           else a.exclude_benchmark), mode=a.mode, recipe=a.recipe,
        backbone=a.backbone, dim=a.dim, input_size=pick("input_size"), pretrained=a.pretrained,
        backbone_weights=a.backbone_weights, teacher=a.teacher,
        teacher_size=a.teacher_size, batch_size=pick("batch_size"), lr=a.lr, base_lr=pick("base_lr"),
        sgd_momentum=a.sgd_momentum, weight_decay=a.weight_decay, epochs=pick("epochs"), max_steps=a.max_steps,
        warmup_epochs=pick("warmup_epochs"), warmup_steps=a.warmup_steps, clip_grad=a.clip_grad,
        bn="frozen" if a.freeze_bn else (a.bn or ("frozen" if a.head_steps else "train")), train_blocks=a.train_blocks,
        head_steps=a.head_steps, heads=_head_settings(a), hn_ramp_steps=a.hn_ramp_steps,
        moco_momentum_end=a.moco_momentum_end, export_momentum=a.export_momentum, feature_weight=a.feature_weight, rsd_positive=a.rsd_positive,
        backbone_lr_mult=a.backbone_lr_mult,
        queue_size=pick("queue_size"), rsd_queue_size=pick("rsd_queue_size"), moco_momentum=a.moco_momentum,
        moco_temp=a.moco_temp, rsd_temp=a.rsd_temp, rsd_weight=a.rsd_weight, moco_weight=a.moco_weight,
        hn_weight=a.hn_weight, infonce_temp=a.infonce_temp, entropy_weight=a.entropy_weight, canvas=a.canvas,
        overlays=a.overlays, cache=a.cache, cache_views=a.cache_views, ckpt_every=a.ckpt_every, workers=a.workers,
        device=a.device, amp=a.amp, seed=a.seed, threads=a.threads, eval_benchmark=a.eval_benchmark,
        eval_every=a.eval_every, eval_at_start=a.eval_at_start, log_every=a.log_every, progress=a.progress,
        resume=a.resume)


def _head_settings(a: argparse.Namespace) -> dict:
    import dataclasses

    from rdcd.distill.heads import HeadConfig

    return dataclasses.asdict(HeadConfig(steps=a.head_steps, seed=a.seed, mode=a.head_mode, init=a.head_init, lr=a.head_lr, batch_size=a.head_batch_size,
                                         hn_weight=a.head_hn_weight, moco_temp=a.moco_temp, rsd_temp=a.rsd_temp,
                                         momentum=a.moco_momentum, rsd_positive=a.rsd_positive,
                                         **({"momentum_end": a.moco_momentum_end} if a.moco_momentum_end is not None
                                            else {})))


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    cli.setup_logging(a.verbose)
    from rdcd.distill import preflight

    preflight.check_inputs(a.train_dir, a.exclude_benchmark, a.eval_benchmark)  # before torch loads: fast
    from rdcd.distill.train import train
    from rdcd.model import backbone_info

    backbone_info(a.backbone)  # unknown backbone: one line before anything heavy
    from rdcd.distill.checkpoint import AlreadyDone

    cfg = config_from_args(a)
    cfg.validate()
    import os

    try:
        result = train(cfg)
    except AlreadyDone as done:
        if os.environ.get("RANK", "0") == "0":
            print(f"rdcd-distill: {done}", file=sys.stderr)
            print(json.dumps({"out": cfg.out, "steps": done.step, "already_done": True}))
        return 0
    if os.environ.get("RANK", "0") != "0":
        return 0
    summary = {"out": cfg.out, **{k: result["result"][k] for k in ("steps", "epochs", "train_img_per_s")}}
    if result["result"].get("eval"):
        summary["eval"] = result["result"]["eval"][-1]
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
