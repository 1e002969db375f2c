"""``rdcd-index``: a searchable reference collection of compact descriptors. **No torch.**

::

    rdcd-index build  --model ARTIFACT_OR_EXPORT_DIR --images DIR --out INDEX [--codes fp32|int8|binary|pq]
                      [--ivf auto|off|NLIST] [--ids stem|relpath] [--background DIR]
                      [--uri URI [--collection NAME]] [--force]
    rdcd-index add    --index INDEX --images DIR [--replace]
    rdcd-index search --index INDEX --images QDIR --out matches.csv [--k 10] [--threshold auto|FLOAT] [--nprobe N]
                      [--score-norm 1.0[0,2]]
    rdcd-index info   --index INDEX

An exported artifact (``.onnx``, ``.xml``, ``.engine``, ``.mlpackage``, or an export folder with
``manifest.json``: its ``onnx-fp32`` row unless ``--artifact NAME``) runs through the runners of
:mod:`rdcd.validate.runtimes`; its preprocessing and input size come from the manifest as in
``rdcd-bench``. Reference ids are file stems (DISC2021), or with ``--ids relpath`` the path below
``--images`` without extension. ``search`` writes ``query_id,reference_id,score`` (read by
``rdcd-validate metrics``), best ``--k`` per query, keeping scores >= ``--threshold``; ``auto`` is the
score at precision 0.9 that the gate measured for this model (``threshold_at_p90`` in a gate
``report.json`` given with ``--report`` or found beside the model). ``add`` and
``search`` refuse a model whose sha256 differs from the index's. ``--score-norm`` shifts each query's
scores by its similarity to the background set kept at build time (:class:`rdcd.validate.search.ScoreNorm`,
the code of ``rdcd-validate eval --score-norm``). Backends and format:
:mod:`rdcd.validate.index`, :mod:`rdcd.validate.index_milvus`; inputs: :mod:`rdcd.validate.index_inputs`. Exit codes: 0, 2 on bad input (one line).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from rdcd import cli
from rdcd.errors import RdcdError
from rdcd.targets import RUNTIMES
from rdcd.validate.index import BACKGROUND_FILE, CODES, META_FILE, FaissStore, ivf_plan, new_meta, open_store, pq_subquantizers, \
    public_meta, read_meta
from rdcd.validate.index_inputs import check_model, describe_folder, find_operating_point, list_folder, load_model, \
    resolve_threshold


# ------------------------------------------------------------------------------------------- commands
def _history(meta: dict, op: str, images: str, added: int, replaced: int, bad: int, seconds: float) -> None:
    from rdcd.manifest import now

    meta.setdefault("history", []).append({"op": op, "at": now(), "images": str(Path(images).resolve()), "added": added,
                                           "replaced": replaced, "unreadable": bad, "seconds": round(seconds, 2)})


def _build(a) -> int:
    out = Path(a.out)
    if out.exists():
        if not (out.is_dir() and ((out / META_FILE).is_file() or not any(out.iterdir()))):
            raise RdcdError(f"--out {out} exists and is not an rdcd index")
        if (out / META_FILE).is_file() and not a.force:
            raise RdcdError(f"index {out} exists: pass --force to rebuild it, or use rdcd-index add")
    cli.writable_dir(out, "--out", clean=True)
    if a.ivf not in ("auto", "off") and not (a.ivf.isdigit() and int(a.ivf) >= 1):
        raise RdcdError(f"--ivf must be auto, off or a number of lists >= 1, not {a.ivf!r}")
    if a.uri:
        from rdcd.validate.index_milvus import is_lite, normalise_uri

        normalise_uri(a.uri)
        if a.codes == "binary" and is_lite(a.uri):
            raise RdcdError("Milvus Lite has no binary vectors: use --codes binary without --uri (faiss) or a server --uri")
    t0 = time.perf_counter()
    paths, ids = list_folder(a.images, a.ids)
    background = list_folder(a.background, "stem") if a.background else None
    runner, spec, model = load_model(a)
    ids, vecs, bad = describe_folder(runner, spec, paths, ids, a.batch_size, a.log_every, "references")
    dim = vecs.shape[1]
    pq_m = pq_subquantizers(dim, a.pq_m) if a.codes == "pq" else None
    meta = new_meta(model, dim, spec.to_dict(), a.codes, a.ids, ivf_plan(len(vecs), a.codes, a.ivf), pq_m,
                    backend="milvus" if a.uri else "faiss")
    meta["operating_point"] = find_operating_point(model, a.report)
    if background:
        _, meta["_background"], bg_bad = describe_folder(runner, spec, *background, a.batch_size, a.log_every,
                                                         "background")
        meta["background"] = {"file": BACKGROUND_FILE, "count": len(meta["_background"]), "unreadable": bg_bad,
                              "images": str(Path(a.background).resolve())}
    if a.uri:
        from rdcd.validate.index_milvus import MilvusStore, default_collection

        store = MilvusStore.create(meta, a.uri, a.collection or default_collection(out), vecs, a.token, a.force)
    else:
        store = FaissStore.create(meta, vecs)
    added, _ = store.add(ids, vecs)
    _history(meta, "build", a.images, added, 0, bad, time.perf_counter() - t0)
    store.save(out)
    store.close()
    where = f"Milvus {meta['milvus']['collection']} at {meta['milvus']['uri']}" if a.uri else meta["faiss"]["index"]
    print(f"{out}: {added} references ({a.codes}, {dim}-d, {where})" + (f", {bad} unreadable skipped" if bad else ""))
    return 0


def _open(a) -> tuple[dict, object]:
    meta = read_meta(a.index)
    return meta, open_store(a.index, meta, uri=getattr(a, "uri", None), token=getattr(a, "token", None))


def _model_for(a, meta):
    a.model = a.model or meta["model"]["path"]
    if not Path(a.model).exists():
        raise RdcdError(f"model not found: {a.model} (the index's model; pass --model)")
    runner, spec, model = load_model(a)
    check_model(meta, model, spec)
    return runner, spec, model


def _add(a) -> int:
    meta, store = _open(a)
    mode = meta["ids"]["mode"]
    if a.ids and a.ids != mode:
        raise RdcdError(f"index {a.index} uses --ids {mode}, not {a.ids}")
    t0 = time.perf_counter()
    paths, ids = list_folder(a.images, mode)
    if not a.replace:
        from rdcd.validate.index import check_new_ids

        check_new_ids(ids, store.has(ids), False)  # refuse before minutes of extraction
    runner, spec, _ = _model_for(a, meta)
    ids, vecs, bad = describe_folder(runner, spec, paths, ids, a.batch_size, a.log_every, "references")
    if vecs.shape[1] != int(meta["dim"]):
        raise RdcdError(f"the model gives {vecs.shape[1]}-d descriptors, the index holds {meta['dim']}-d")
    added, replaced = store.add(ids, vecs, replace=a.replace)
    _history(meta, "add", a.images, added, replaced, bad, time.perf_counter() - t0)
    store.save(a.index)
    store.close()
    print(f"{a.index}: +{added} references" + (f", {replaced} replaced" if replaced else "")
          + (f", {bad} unreadable skipped" if bad else "") + f" ({meta['count']} in all)")
    return 0


def _search(a) -> int:
    if a.k < 1:
        raise RdcdError("--k must be >= 1")
    cli.writable_file(a.out, "--out", clean=True)
    meta, store = _open(a)
    runner, spec, model = _model_for(a, meta)
    norm = None
    if a.score_norm:
        from rdcd.validate.search import ScoreNorm

        norm = ScoreNorm.parse(a.score_norm)
        if meta.get("_background") is None:
            raise RdcdError(f"--score-norm needs background descriptors: index {a.index} was built without "
                            f"--background DIR")
        if a.threshold == "auto":
            raise RdcdError("--threshold auto is the gate's operating point for raw scores: with --score-norm "
                            "give a number")
    thr = resolve_threshold(a.threshold, meta, model, a.report)
    paths, qids = list_folder(a.images, a.ids or "stem")
    qids, vecs, bad = describe_folder(runner, spec, paths, qids, a.batch_size, a.log_every, "queries")
    if vecs.shape[1] != int(meta["dim"]):
        raise RdcdError(f"the model gives {vecs.shape[1]}-d descriptors, the index holds {meta['dim']}-d")
    hits = store.search(vecs, a.k, a.nprobe)
    store.close()
    if norm is not None:  # SSCD's normalisation, as rdcd-validate eval --score-norm: shift each query's scores
        shift = norm.offsets(vecs, meta["_background"])[:, 0].tolist()
        hits = [[(ref, score + d) for ref, score in row] for row, d in zip(hits, shift)]
    from rdcd.fsutil import atomic_path

    rows = 0
    with atomic_path(a.out) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["query_id", "reference_id", "score"])
            for q, row in zip(qids, hits):
                for ref, score in row:
                    if thr is None or score >= thr:
                        w.writerow([q, ref, f"{score:.9g}"])
                        rows += 1
    print(f"{a.out}: {rows} matches for {len(qids)} queries (k={a.k}"
          + (f", score >= {thr:.6g}" if thr is not None else "") + ")" + (f", {bad} unreadable skipped" if bad else ""))
    return 0


def _info(a) -> int:
    meta, store = _open(a)
    live = store.stats()
    store.close()
    shown = public_meta(meta)
    if "binary" in shown:
        shown["binary"] = {k: v for k, v in shown["binary"].items() if k != "center"}
    print(json.dumps({**shown, "live": live}, indent=2))
    return 0


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="rdcd-index", description="Index reference images by their compact descriptors "
                                                          "and search queries against them (no torch needed).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{build,add,search,info}")

    def model_args(s, required: bool):
        s.add_argument("--model", required=required, default=None,
                       help="exported artifact or export folder" + ("" if required else " (default: the index's)"))
        s.add_argument("--artifact", default=None, help="row of an export folder's manifest (default onnx-fp32)")
        s.add_argument("--runtime", default="auto", choices=("auto", *RUNTIMES))
        s.add_argument("--threads", type=int, default=None, help="CPU threads of the runtime and faiss")
        s.add_argument("--size", type=int, default=None,
                       help="input size (default: the manifest's, the model's metadata or its fixed input shape)")
        s.add_argument("--batch-size", type=int, default=32)
        s.add_argument("--log-every", type=int, default=1000, help="one progress line per N images (0: none)")
        s.add_argument("--images", required=True, help="image folder")

    def milvus_args(s):
        s.add_argument("--uri", default=None, help="Milvus: ./file.db (Milvus Lite) or http://host:19530")
        s.add_argument("--token", default=None, help="Milvus token (default $MILVUS_TOKEN; never stored)")

    b = sub.add_parser("build", help="index a folder of reference images")
    model_args(b, True)
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--codes", default="fp32", choices=CODES)
    b.add_argument("--ivf", default="auto", help="auto (IVF from 200k references, and for pq), off, or NLIST")
    b.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers (default dim/4)")
    b.add_argument("--ids", default="stem", choices=("stem", "relpath"), help="reference ids (default: file stem)")
    b.add_argument("--report", default=None, help="gate report.json whose threshold_at_p90 the index records")
    b.add_argument("--force", action="store_true", help="replace an existing index / Milvus collection")
    b.add_argument("--background", default=None,
                   help="folder of background images (not copies of the references) kept for search --score-norm")
    milvus_args(b)
    b.add_argument("--collection", default=None, help="Milvus collection (default rdcd_<index folder name>)")
    ad = sub.add_parser("add", help="add reference images to an index")
    ad.add_argument("--index", required=True)
    model_args(ad, False)
    ad.add_argument("--ids", default=None, choices=("stem", "relpath"))
    ad.add_argument("--replace", action="store_true", help="replace references whose ids are already indexed")
    milvus_args(ad)
    s = sub.add_parser("search", help="search query images, write query_id,reference_id,score")
    s.add_argument("--index", required=True)
    model_args(s, False)
    s.add_argument("--out", required=True, help="matches CSV")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--threshold", default=None, help="keep scores >= this; auto: the gate's threshold_at_p90")
    s.add_argument("--report", default=None, help="gate report.json (or its folder) for --threshold auto")
    s.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (default: the index's)")
    s.add_argument("--score-norm", default=None,
                   help="BETA[START,END], e.g. 1.0[0,2]: subtract BETA x the mean of the query's START..END-th "
                        "background similarities (SSCD; needs build --background)")
    s.add_argument("--ids", default=None, choices=("stem", "relpath"), help="query ids (default stem)")
    milvus_args(s)
    i = sub.add_parser("info", help="print an index's metadata as JSON")
    i.add_argument("--index", required=True)
    milvus_args(i)
    return p


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    cli.setup_logging()
    for name in ("batch_size", "threads", "size", "log_every", "pq_m", "nprobe"):
        v = getattr(a, name, None)
        if v is not None and v < (0 if name == "log_every" else 1):
            raise RdcdError(f"--{name.replace('_', '-')} must be >= {0 if name == 'log_every' else 1}")
    if getattr(a, "threads", None):
        from rdcd.validate.search import _faiss

        _faiss().omp_set_num_threads(a.threads)
    return {"build": _build, "add": _add, "search": _search, "info": _info}[a.cmd](a)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
