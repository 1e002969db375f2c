"""``rdcd-validate``: copy-detection metrics, benchmarks, evaluation and the INT8 accuracy gate.

Sub-commands::

    rdcd-validate metrics --predictions P.csv --ground-truth G.csv     # ISC2021 metrics as JSON
    rdcd-validate build-demo OUT [--source skimage|DIR --holdout N ...]   # DISC-layout demo benchmark
    rdcd-validate eval --benchmark B --model M [--whiten --score-norm 1.0[0,2]]
    rdcd-validate gate --benchmark B --exports DIR [--max-drop 0.005]   # also the default:
    rdcd-validate --benchmark B --exports DIR ...                      #   no sub-command = gate
    rdcd-validate merge --report OUT --bench-json F                    # add rdcd-bench device columns
    rdcd-validate sweep --checkpoint RUN --benchmark B --calib-dir D --out DIR   # µAP / latency front

Exit codes: 0 success, 1 a gate failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from rdcd import cli
from rdcd.errors import RdcdError

SUBCOMMANDS = ("metrics", "build-demo", "eval", "gate", "merge", "sweep")


def _metrics(argv: Sequence[str]) -> int:
    p = cli.ArgumentParser(prog="rdcd-validate metrics",
                           description="Micro-AP and recall at precision 0.9 under ISC2021 rules, printed as JSON.")
    p.add_argument("--predictions", required=True, help="CSV query_id,reference_id,score")
    p.add_argument("--ground-truth", required=True,
                   help="CSV with the header query_id,reference_id (empty reference: no match)")
    p.add_argument("--max-per-query", type=cli.positive_int, default=None,
                   help="keep only each query's top-k predictions (ISC2021 used k=10); default: all")
    p.add_argument("--curve", action="store_true", help="include the precision-recall curve")
    a = p.parse_args(argv)
    from rdcd.benchmark import read_ground_truth
    from rdcd.validate.metrics import check_alignment, evaluate, read_predictions

    preds = read_predictions(a.predictions)
    if a.max_per_query:
        preds = preds.top_k_per_query(a.max_per_query)
    pairs, listed = read_ground_truth(a.ground_truth)
    check_alignment(preds, listed, a.predictions, a.ground_truth)
    print(json.dumps(evaluate(preds, pairs).to_dict(curve=a.curve), indent=2))
    return 0


def _build_demo(argv: Sequence[str]) -> int:
    from rdcd.validate.demo import DemoConfig, build_demo

    p = cli.ArgumentParser(prog="rdcd-validate build-demo",
                           description="Build a DISC2021-layout benchmark of real photos and DISC-style edited copies.")
    p.add_argument("out", help="output folder")
    p.add_argument("--source", action="append", metavar="skimage|DIR",
                   help="'skimage' (photos shipped with scikit-image, the default) or an image folder; repeat to mix "
                        "folders (e.g. the pool and the photos) into one benchmark")
    p.add_argument("--holdout", type=cli.nonnegative_int, action="append", metavar="N",
                   help="with a folder: use this many held-out images (chosen by sha1 of the name; 0 = all); one "
                        "value for every --source, or one per --source")
    p.add_argument("--queries-per-ref", type=cli.positive_int, default=1, help="edited copies per matched reference (default 1)")
    p.add_argument("--positive-share", type=float, default=DemoConfig.positive_share,
                   help=f"share of references that get edited copies (default {DemoConfig.positive_share})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing benchmark")
    a = p.parse_args(argv)
    from rdcd.benchmark import load_benchmark
    from rdcd.errors import RdcdError

    sources = a.source or ["skimage"]
    holdouts = a.holdout or [0]
    if len(holdouts) == 1:
        holdouts = holdouts * len(sources)
    if len(holdouts) != len(sources):
        raise RdcdError(f"give one --holdout for all sources or one per --source ({len(sources)}), not {len(holdouts)}")
    if "skimage" in sources[1:]:
        raise RdcdError("'skimage' can only be the first --source")
    if not (0 < a.positive_share <= 1):
        raise RdcdError("--positive-share must be in (0, 1]")
    cli.writable_dir(a.out, "OUT", clean=True)
    out = build_demo(a.out, DemoConfig(source=sources[0], holdout=holdouts[0],
                                       extra=tuple(zip(sources[1:], holdouts[1:])), queries_per_ref=a.queries_per_ref,
                                       positive_share=a.positive_share, seed=a.seed), force=a.force)
    print(json.dumps({"benchmark": str(out), **load_benchmark(out).summary()}, indent=2))
    return 0


def _eval(argv: Sequence[str]) -> int:
    from rdcd.validate.models import model_spec  # numpy and PIL: only for eval, not every subcommand

    p = cli.ArgumentParser(prog="rdcd-validate eval", description="Evaluate one model on a DISC-layout benchmark.")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--model", required=True, action="append", type=model_spec,
                   help="teacher | pdq | student:BACKBONE[:DIM] | run dir | .onnx/.xml/.engine/.mlpackage (repeatable)")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--size", type=cli.positive_int, default=None, help="input size when the artifact does not say")
    p.add_argument("--k", type=cli.positive_int, default=10, help="neighbours per query (ISC2021: 10)")
    p.add_argument("--whiten", action="store_true", help="PCA-whitening fitted on training/")
    p.add_argument("--score-norm", default=None, help="e.g. 1.0[0,2]: subtract the mean top-1..3 background similarity")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--threads", type=cli.positive_int, default=None)
    p.add_argument("--predictions-out", default=None, help="write the predictions CSV here (single model)")
    a = p.parse_args(argv)
    if a.score_norm:
        from rdcd.validate.search import ScoreNorm

        ScoreNorm.parse(a.score_norm)
    if a.predictions_out:
        if len(a.model) > 1:
            raise RdcdError("--predictions-out takes one --model (the predictions of one model)")
        cli.writable_file(a.predictions_out, "--predictions-out", clean=True)
    from rdcd.benchmark import load_benchmark
    from rdcd.validate.evaluate import describe, evaluate_descriptors
    from rdcd.validate.metrics import write_predictions
    from rdcd.validate.models import resolve_model

    bench = load_benchmark(a.benchmark)
    results = []
    for spec in a.model:
        emb, pspec, label = resolve_model(spec, size=a.size, runtime=a.runtime, threads=a.threads)
        desc = describe(bench, emb, pspec, a.batch_size, with_training=a.whiten or bool(a.score_norm), label=label)
        res = evaluate_descriptors(bench, desc, k=a.k, whiten=a.whiten, score_norm=a.score_norm)
        if a.predictions_out:
            write_predictions(a.predictions_out, res.predictions)
        results.append({"model": label, **res.row(), "seconds": round(desc.seconds, 2)})
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(cli.plain_text(__doc__))
        return 0
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
    else:
        if argv and not argv[0].startswith("-"):
            raise RdcdError(f"unknown sub-command {argv[0]!r}: choose from {', '.join(SUBCOMMANDS)}")
        cmd, rest = "gate", argv
    if cmd == "metrics":
        return _metrics(rest)
    if cmd == "build-demo":
        return _build_demo(rest)
    if cmd == "eval":
        return _eval(rest)
    if cmd == "sweep":
        from rdcd.validate.sweep import sweep_main

        return sweep_main(rest)
    if cmd == "merge":
        from rdcd.validate.int8_gate import merge_main

        return merge_main(rest)
    from rdcd.validate.int8_gate import gate_main

    return gate_main(rest)


if __name__ == "__main__":
    sys.exit(main())
