"""``rdcd-bench``: end-to-end latency of one exported model on this device. **No torch.**

Runs on a Jetson (TensorRT + numpy), a Mac (coremltools) or any box with onnxruntime / OpenVINO,
with only the runtime installed: this module imports numpy, the standard library and
:mod:`rdcd.validate.runtimes` (which loads the runtime lazily); images are decoded with Pillow only
when ``--images`` is given. ::

    rdcd-bench --model exports/model.onnx --json bench.json [--runtime auto|onnxruntime|tensorrt|coreml|openvino]
               [--batch-size 1] [--warmup 20] [--iters 200] [--threads N] [--size S] [--images DIR] [--label TEXT]

The input size is :func:`rdcd.validate.artifact_input.artifact_input`'s (``--size``, else the ``manifest.json``
beside the model or one folder up, else the ONNX metadata, else the runtime's static input shape). Inputs are
random uint8 RGB images (fixed seed) or real ones from ``--images``.

Measured per call of the runner (a batch of ``--batch-size`` images, host arrays in and out, so for GPU
runtimes the copies are included): latency percentiles p50/p90/p99 (ms), mean, min, max, and
throughput in images/s. For TensorRT also the GPU compute time alone (``gpu_compute_ms``: CUDA
events around ``execute_async_v3`` with the input already on the device, as trtexec reports it). The
JSON records the device (CPU, board, Jetson power mode where readable), runtime and version, threads,
batch and the model's sha256, so that ``rdcd-validate --bench-json`` / ``rdcd-validate merge`` can put
it into a gate report as a device column.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rdcd import __version__, cli
from rdcd.errors import RdcdError
from rdcd.targets import RUNTIMES

SCHEMA = "rdcd-bench/1"
RUNTIME_CHOICES = ("auto", *RUNTIMES)


# ------------------------------------------------------------------------------------------- timing
def summarize_ms(samples_ms: Sequence[float]) -> dict:
    """Percentiles and moments of a list of durations in milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(a.mean()), 4), "min": round(float(a.min()), 4), "max": round(float(a.max()), 4),
            "std": round(float(a.std()), 4), "n": int(a.size)}


def measure_latency(fn: Callable[[np.ndarray], object], batch: np.ndarray, warmup: int, iters: int,
                    batches: Sequence[np.ndarray] | None = None) -> dict:
    """Time ``fn(batch)`` ``iters`` times after ``warmup`` untimed calls.

    ``batches`` (optional) are cycled through instead of repeating one batch. Returns
    ``{"latency_ms": summary, "throughput_ips": images per second}``.
    """
    if iters < 1:
        raise RdcdError("iterations must be >= 1")
    inputs = list(batches) if batches else [batch]
    for i in range(max(0, warmup)):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(iters):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter_ns()
        fn(x)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    images = sum(len(inputs[i % len(inputs)]) for i in range(iters))
    total_s = sum(times) / 1e3
    return {"latency_ms": summarize_ms(times),
            "throughput_ips": round(images / total_s, 2) if total_s > 0 else None}


def tensorrt_gpu_compute(runner, batch: np.ndarray, warmup: int, iters: int) -> tuple[dict | None, str | None]:
    """GPU compute time of a TensorRT engine alone (like trtexec's "GPU Compute Time").

    Inputs stay on the device: one ordinary call binds shapes and buffers, then CUDA events on the
    runner's stream bracket ``execute_async_v3``. Works with the runner's cuda-python or pycuda
    backend; returns (summary, None) or (None, why not).
    """
    if getattr(runner, "name", "") != "tensorrt":
        return None, None
    cuda, ctx = getattr(runner, "cuda", None), getattr(runner, "context", None)
    if cuda is None or ctx is None:
        return None, "the TensorRT runner exposes no CUDA stream/context"
    if len(batch) > getattr(runner, "max_batch", len(batch)):
        return None, f"batch {len(batch)} exceeds the engine's maximum batch"
    try:
        runner(batch)  # sets the input shape and tensor addresses for this batch size
        if hasattr(cuda, "rt"):  # cuda-python runtime API: calls return (err, value...)
            rt, call = cuda.rt, cuda._call
            start, end = call(rt.cudaEventCreate()), call(rt.cudaEventCreate())

            def once() -> float:
                call(rt.cudaEventRecord(start, cuda.stream))
                if not ctx.execute_async_v3(cuda.stream_handle):
                    raise RdcdError("execute_async_v3 failed")
                call(rt.cudaEventRecord(end, cuda.stream))
                call(rt.cudaEventSynchronize(end))
                return float(call(rt.cudaEventElapsedTime(start, end)))

            def close() -> None:
                rt.cudaEventDestroy(start)
                rt.cudaEventDestroy(end)
        else:  # pycuda
            start, end = cuda.cuda.Event(), cuda.cuda.Event()

            def once() -> float:
                start.record(cuda.stream)
                if not ctx.execute_async_v3(cuda.stream_handle):
                    raise RdcdError("execute_async_v3 failed")
                end.record(cuda.stream)
                end.synchronize()
                return float(start.time_till(end))

            def close() -> None:
                pass
        try:
            for _ in range(max(0, warmup)):
                once()
            return summarize_ms([once() for _ in range(iters)]), None
        finally:
            close()
    except Exception as exc:  # noqa: BLE001 - the end-to-end numbers stand on their own
        return None, f"GPU compute time not measured: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# ----------------------------------------------------------------------------------- model details
def make_inputs(size: int, batch: int, images: str | None, seed: int = 0, max_batches: int = 8) -> tuple[list[np.ndarray], str]:
    """Input batches: random uint8 RGB (fixed seed), or real images from a folder (resized per the contract)."""
    if not images:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)], "random uint8"
    from rdcd.imageio import list_images
    from rdcd.preprocess import PreprocessSpec

    folder = Path(images)
    if not folder.is_dir():
        raise RdcdError(f"image folder not found: {folder}")
    paths = list_images(folder)[: batch * max_batches]
    if not paths:
        raise RdcdError(f"no images in {folder}")
    spec = PreprocessSpec(size=size)
    arr = spec.load_batch(paths)
    if len(arr) < batch:
        arr = np.concatenate([arr] * (-(-batch // len(arr))))[:batch]
    batches = [arr[i: i + batch] for i in range(0, len(arr) - batch + 1, batch)]
    return batches, f"{len(paths)} images from {folder}"


def device_label(record: dict) -> str:
    """``"<board or CPU> / <runtime> <version>"``, the column title in gate reports."""
    if record.get("label"):
        return str(record["label"])
    dev = record.get("device") or {}
    rt = record.get("runtime") or {}
    where = dev.get("board") or dev.get("gpu") or dev.get("cpu") or dev.get("machine") or "unknown device"
    label = f"{where} / {rt.get('runtime', '?')} {rt.get('version', '')}".strip()
    batch = (record.get("settings") or {}).get("batch", 1)
    return label + (f" (batch {batch})" if batch and batch != 1 else "")


# ------------------------------------------------------------------------------------------------ CLI
#: argparse ``type=`` for ``--size``: an image side of at least 16 pixels
_input_size = cli.number(int, 16, "an integer >= 16")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="rdcd-bench",
                           description="End-to-end latency of one exported descriptor model on this device "
                                       "(no torch needed). Writes a JSON that rdcd-validate can merge into its report.")
    p.add_argument("--model", required=True, help=".onnx, .xml (OpenVINO), .engine/.plan (TensorRT) or .mlpackage")
    p.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES, help="default: from the file type")
    p.add_argument("--batch-size", dest="batch", type=cli.positive_int, default=1, help="images per call (default 1)")
    p.add_argument("--batch", dest="batch", type=cli.positive_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=cli.nonnegative_int, default=20, help="untimed calls first (default 20)")
    p.add_argument("--iters", type=cli.positive_int, default=200, help="timed calls (default 200)")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="CPU threads for onnxruntime/OpenVINO (default: runtime's)")
    p.add_argument("--size", type=_input_size, default=None,
                   help="input size (default: the manifest's, the model's metadata or its fixed input shape)")
    p.add_argument("--images", default=None, help="folder of real images to feed (default: random uint8 images)")
    p.add_argument("--label", default=None, help="device column title in reports (default: board or CPU / runtime)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, dest="json_out", help="write the results here")
    return p


def run_bench(args, argv: Sequence[str] | None = None) -> dict:
    """The bench record for parsed arguments (checked at parse time by :func:`build_parser`)."""
    model = Path(args.model)
    if not model.exists():
        raise RdcdError(f"model not found: {model}")
    from rdcd.fsutil import sha256, size_bytes
    from rdcd.validate.artifact_input import artifact_input
    from rdcd.validate.bench_checks import check_batch_memory
    from rdcd.validate.device import device_info, load_average
    from rdcd.validate.runtimes import load_runner

    runner = load_runner(model, runtime=args.runtime, threads=args.threads)
    given = artifact_input(model, runner, args.size)
    entry, size, size_from = given.row, given.spec.size, given.source
    check_batch_memory(args.batch, size, model)
    batches, input_desc = make_inputs(size, args.batch, args.images, args.seed)
    out = runner(batches[0])
    if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != args.batch:
        raise RdcdError(f"{model.name} returned shape {getattr(out, 'shape', None)} for a batch of {args.batch}")
    m = measure_latency(runner, batches[0], args.warmup, args.iters, batches)
    gpu_ms, gpu_note = tensorrt_gpu_compute(runner, batches[0], args.warmup, args.iters)
    desc = runner.describe()
    record = {
        "schema": SCHEMA,
        "tool": "rdcd-bench",
        "rdcd_version": __version__,
        "created": _now(),
        "label": args.label,
        "model": {"path": str(model), "name": model.name, "sha256": sha256(model), "size_bytes": size_bytes(model),
                  "artifact": entry.name if entry else None,
                  "target": entry.target if entry else None,
                  "precision": entry.precision if entry else None},
        "runtime": {**desc, "runtime": desc.get("runtime", getattr(runner, "name", args.runtime)),
                    "version": desc.get("version", getattr(runner, "version", "?"))},
        "device": device_info(),
        "settings": {"batch": args.batch, "warmup": args.warmup, "iters": args.iters, "threads": args.threads,
                     "size": size, "size_from": size_from, "input": input_desc, "output_dim": int(out.shape[1]),
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_1m": load_average()},
        "latency_ms": m["latency_ms"],
        "per_image_ms_p50": round(m["latency_ms"]["p50"] / args.batch, 4),
        "throughput_ips": m["throughput_ips"],
        "gpu_compute_ms": gpu_ms,
        "gpu_compute_note": gpu_note,
        "command": " ".join(["rdcd-bench", *(sys.argv[1:] if argv is None else argv)]),
    }
    record["device_label"] = device_label(record)
    return record


def _now() -> str:
    from rdcd.manifest import now

    return now()


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.writable_file(args.json_out, "--json", clean=True)
    record = run_bench(args, argv)
    from rdcd.fsutil import write_json

    write_json(args.json_out, record)
    lat = record["latency_ms"]
    gpu = record["gpu_compute_ms"]
    print(f"{record['model']['name']} on {record['device_label']}: p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, "
          f"p99 {lat['p99']:.3f} ms, {record['throughput_ips']} img/s (batch {args.batch}, {args.iters} iters"
          + (f", GPU compute p50 {gpu['p50']:.3f} ms" if gpu else "") + f") -> {args.json_out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
