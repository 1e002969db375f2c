"""TensorRT: engine inputs, the exact ``trtexec`` build commands, and engines where a GPU is present.

An engine is specific to the GPU and TensorRT version that built it, so a Jetson builds its own:
``tensorrt/build_engine.sh`` holds the exact ``trtexec`` command lines for that, next to their
ONNX inputs:

* ``model.onnx``: the FP32 ONNX artifact (uint8 NHWC ``image``), built with ``--fp16`` by
  TensorRT 8.6-10.x;
* ``model-fp16.onnx``: the same graph with FP16 weights and compute (``onnxruntime``'s float16
  converter; the input cast, the uint8 input and the GeM/projection/L2 tail stay FP32), for
  ``--stronglyTyped`` builds: TensorRT 11 removed ``--fp16``/``--int8`` (weak typing);
* ``model-int8.onnx``: the QDQ model of ``rdcd-quantize`` (symmetric int8 activations): its scales
  are explicit, so ``--int8`` (TensorRT 10) / ``--stronglyTyped`` (11) needs no calibration cache.

``rdcd-export`` and ``rdcd-quantize`` both (re)write the one script through :func:`write_script`,
with the batch profile the export recorded in the manifest (:func:`profile_batch`). Where
``tensorrt`` imports and a CUDA device exists, :func:`build` builds ``model-fp16.engine`` (export)
or ``model-int8.engine`` (quantize) with the Python API, same settings. No torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from rdcd.artifact import LAYOUT, artifact_name, layout_path
from rdcd.errors import RdcdError
from rdcd.fsutil import atomic_path, write_bytes, write_text

log = logging.getLogger(__name__)

DIRNAME = os.path.dirname(layout_path("tensorrt", "fp16"))
SCRIPT = "build_engine.sh"
ONNX = "model.onnx"
ONNX_FP16 = "model-fp16.onnx"
ONNX_INT8 = "model-int8.onnx"
#: precision -> engine file name in :data:`DIRNAME` (from :data:`rdcd.artifact.LAYOUT`, the one source of truth)
ENGINES = {p: os.path.basename(path) for (t, p), path in LAYOUT.items() if t == "tensorrt"}
DEFAULT_BATCH = 8
WORKSPACE_GIB = 2
NOT_BUILT = "not built: no NVIDIA GPU/TensorRT on this machine"


def availability() -> tuple[bool, str]:
    """(can build and run engines here, why not)."""
    why = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        why.append("tensorrt is not installed")
    except Exception as exc:  # a broken install (missing libnvinfer)
        why.append(f"tensorrt does not load: {str(exc).splitlines()[0]}")
    from rdcd.validate.cuda import cuda_devices

    count, reason = cuda_devices()
    if not count:
        why.append(f"no CUDA device ({reason.split(':')[0]})")
    return (not why), "; ".join(why)


def shape_args(size: int, batch: int) -> list[str]:
    return [f"--minShapes=image:1x{size}x{size}x3", f"--optShapes=image:{batch}x{size}x{size}x3",
            f"--maxShapes=image:{batch}x{size}x{size}x3"]


def profile_batch(manifest) -> int:
    """The engines' batch profile (1..N, optimised for N) that rdcd-export recorded in the manifest."""
    fp16 = manifest.get(artifact_name("tensorrt", "fp16"))  # manifests written before the batch was recorded
    batch = manifest.trt_batch or (fp16.produced_by.options.get("max_batch") if fp16 else None) or DEFAULT_BATCH
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise RdcdError(f"malformed {manifest.path}: the TensorRT batch profile {batch!r} is not a positive integer")
    return batch


def inputs(precision: str) -> tuple[str, str]:
    """(ONNX input for TensorRT <= 10, for TensorRT 11's strongly typed build) of an engine."""
    return (ONNX, ONNX_FP16) if precision == "fp16" else (ONNX_INT8, ONNX_INT8)


def build_options(precision: str, size: int, batch: int) -> tuple[dict, str]:
    """``produced_by`` options of an engine row, and its trtexec line for TensorRT <= 10."""
    weak, strong = inputs(precision)
    engine = ENGINES[precision]
    return ({"min_batch": 1, "opt_batch": batch, "max_batch": batch, "onnx": f"{DIRNAME}/{weak}",
             "onnx_strongly_typed": f"{DIRNAME}/{strong}", "script": f"{DIRNAME}/{SCRIPT}",
             "command_strongly_typed": trtexec_command(strong, engine, size, batch, strongly_typed=True)},
            trtexec_command(weak, engine, size, batch, precision))


def trtexec_command(onnx: str, engine: str, size: int, batch: int, precision: str = "fp16",
                    strongly_typed: bool = False, trtexec: str = "trtexec") -> str:
    """The exact ``trtexec`` line (paths relative to the ``tensorrt/`` folder)."""
    args = [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    elif precision == "fp16":
        args.append("--fp16")
    elif precision == "int8":
        args += ["--int8", "--fp16"]  # Q/DQ scales are explicit: no calibration cache; FP16 elsewhere
    else:
        raise ValueError(precision)
    return " ".join(args + shape_args(size, batch))


def link_or_copy(src: Path, dst: Path) -> Path:
    """``dst`` with the bytes of ``src`` (a hard link where possible), replaced atomically."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return dst


def write_fp16_onnx(src: Path, dst: Path) -> Path:
    """FP16 copy of the graph for strongly typed builds; the tail after the last Conv stays FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    nodes = list(model.graph.node)
    last_conv = max((i for i, n in enumerate(nodes) if n.op_type == "Conv"), default=len(nodes))
    keep = [n.name for n in nodes[last_conv + 1:] if n.name]
    image_readers = [n.name for n in nodes if model.graph.input[0].name in n.input and n.name]
    fp16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep + image_readers)
    fp16.producer_name = "rdcd"
    with atomic_path(dst) as tmp:
        onnx.save(fp16, str(tmp))
    return dst


def script_text(label: str, size: int, batch: int, dim: int, int8: bool = False, fp16: bool = True) -> str:
    """The one build script: the FP16 engine (when its inputs are there) and the INT8 one (when the quantize
    stage's QDQ model is), a TensorRT 11 (strongly typed) and a TensorRT <= 10 (--fp16/--int8) branch."""
    from rdcd import __version__
    from rdcd.manifest import now

    tx = '"$TRTEXEC"'
    wanted = [p for p, on in (("fp16", fp16), ("int8", int8)) if on]
    if not wanted:
        raise ValueError("no engine to build")

    def line(precision, strong):
        return "  " + trtexec_command(inputs(precision)[strong], ENGINES[precision], size, batch, precision,
                                      strongly_typed=strong, trtexec=tx)

    lines = [
        "#!/bin/sh",
        f"# Build TensorRT engines for {label} on the device that will run them (engines are specific to",
        "# the GPU and the TensorRT version; a Jetson builds its own). Run from anywhere:",
        "#   sh build_engine.sh            # " + " and ".join(p.upper() for p in wanted),
        "#   TRTEXEC=/usr/src/tensorrt/bin/trtexec sh build_engine.sh   # JetPack's trtexec",
        f"# Input 'image': uint8 RGB NHWC [batch, {size}, {size}, 3], batch 1..{batch} (optimised for {batch});",
        f"# output 'descriptor': float32 [batch, {dim}], L2-normalised.",
        *(["# INT8: from model-int8.onnx, rdcd-quantize's QDQ model (explicit scales: no calibration cache)."]
          if int8 else []),
        f"# Written by rdcd {__version__} on {now()}.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        'if ! command -v "$TRTEXEC" >/dev/null 2>&1; then',
        '  echo "trtexec not found: add it to PATH or set TRTEXEC (JetPack: /usr/src/tensorrt/bin/trtexec)" >&2',
        "  exit 2",
        "fi",
        "# TensorRT 11 removed weak typing (--fp16/--int8): precision then comes from the ONNX graph.",
        'TRT_VERSION=$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*TensorRT v\\([0-9][0-9]*\\).*/\\1/p\' | head -n 1)',
        'if [ "${TRT_VERSION:-0}" -ge 110000 ]; then',
        *(line(p, True) for p in wanted),
        "else",
        *(line(p, False) for p in wanted),
        "fi",
    ]
    if not int8:
        lines += ["# INT8: run rdcd-quantize --target tensorrt (or rdcd-export --int8): it adds the INT8 lines here."]
    return "\n".join(lines) + "\n"


def write_script(directory: Path, label: str, size: int, batch: int, dim: int, int8: bool = False,
                 fp16: bool = True) -> Path:
    path = directory / SCRIPT
    write_text(path, script_text(label, size, batch, dim, int8, fp16))
    os.chmod(path, 0o755)
    return path


def strongly_typed_default() -> bool:
    """TensorRT 11 dropped weak typing (BuilderFlag.FP16/INT8): build strongly typed there."""
    import tensorrt as trt

    return int(trt.__version__.split(".")[0]) >= 11 or not hasattr(trt.BuilderFlag, "FP16")


def build_engine(onnx_path: Path, engine_path: Path, size: int, batch: int, precision: str = "fp16",
                 strongly_typed: bool | None = None) -> dict:
    """Build a serialized engine with the TensorRT Python API (same settings as the trtexec line)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    strong = strongly_typed_default() if strongly_typed is None else strongly_typed
    flags = 0
    if strong:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RdcdError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_GIB << 30)
    if not strong:
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, size, size, 3), (batch, size, size, 3), (batch, size, size, 3))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RdcdError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above)")
    write_bytes(engine_path, bytes(memoryview(blob)))
    return {"tensorrt": trt.__version__, "strongly_typed": strong, "workspace_gib": WORKSPACE_GIB}


def build(tdir: Path, precision: str, size: int, batch: int) -> dict:
    """Build ``tdir/<ENGINES[precision]>`` from its ONNX input (the graph's own precision on TensorRT 11):
    the ``build`` record of the manifest row."""
    strong = strongly_typed_default()
    onnx_in = inputs(precision)[strong]
    t = time.perf_counter()
    info = build_engine(tdir / onnx_in, tdir / ENGINES[precision], size, batch, precision, strongly_typed=strong)
    return info | {"onnx": f"{DIRNAME}/{onnx_in}", "seconds": round(time.perf_counter() - t, 1)}
