"""Runtime runners: run an exported descriptor model on uint8 RGB NHWC batches. **No torch.**

These run on devices (a Jetson with TensorRT and numpy, a Mac with coremltools, an Intel box with
OpenVINO), so this module imports only numpy and the runtime in question, lazily. Every runner is
a callable ``runner(batch_uint8_nhwc) -> float32 [batch, d]`` with ``name``, ``version`` and
``describe()``; :func:`load_runner` picks one from a path and an optional runtime name.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from rdcd.errors import MissingDependency, RdcdError

RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "coreml")


class Runner:
    name = "runner"
    version = "?"
    fixed_batch: int | None = None  # engines built for one batch size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise RdcdError(f"expected a uint8 NHWC RGB batch, got shape {batch.shape}")
        if self.fixed_batch and batch.shape[0] != self.fixed_batch:
            outs = []
            for i in range(0, len(batch), self.fixed_batch):
                chunk = batch[i: i + self.fixed_batch]
                n = len(chunk)
                if n < self.fixed_batch:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - n, 0)])
                outs.append(self._run(chunk)[:n])
            return np.concatenate(outs)
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"runtime": self.name, "version": self.version}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependency("onnxruntime", "pip install onnxruntime") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise RdcdError(f"ONNX model not found: {self.path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise RdcdError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        inp = self.session.get_inputs()[0]
        if inp.type != "tensor(uint8)":
            raise RdcdError(f"{self.path}: input {inp.name!r} is {inp.type}, expected uint8 NHWC")
        self.input_name = inp.name
        self.input_shape = inp.shape
        self.output_name = self.session.get_outputs()[0].name
        self.version = ort.__version__
        b = inp.shape[0]
        self.fixed_batch = b if isinstance(b, int) and b > 0 else None

    def _run(self, batch):
        return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)

    def describe(self):
        return {"runtime": self.name, "version": self.version, "providers": self.session.get_providers(),
                "threads": self.threads}


def load_runner(path: str | os.PathLike, runtime: str = "auto", threads: int | None = None) -> Runner:
    """A runner for an artifact: ``.onnx`` -> onnxruntime (or TensorRT/OpenVINO when asked),
    ``.xml`` -> OpenVINO, ``.engine``/``.plan`` -> TensorRT, ``.mlpackage``/``.mlmodel`` -> Core ML."""
    path = Path(path)
    if not path.exists():
        raise RdcdError(f"model not found: {path}")
    suffix = path.suffix.lower()
    if runtime == "auto":
        runtime = {".onnx": "onnxruntime", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt",
                   ".mlpackage": "coreml", ".mlmodel": "coreml"}.get(suffix)
        if runtime is None:
            raise RdcdError(f"cannot tell the runtime for {path.name}: pass --runtime")
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(path, threads=threads)
    if runtime == "openvino":
        return OpenVINORunner(path, threads=threads)
    if runtime == "tensorrt":
        return TensorRTRunner(path)
    if runtime == "coreml":
        return CoreMLRunner(path)
    raise RdcdError(f"unknown runtime {runtime!r}: choose from auto, {', '.join(RUNTIMES)}")


def device_info() -> dict:
    """What machine this is, as far as it can be read without extra packages."""
    info = {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = Path("/proc/device-tree/model")
    if model.exists():  # Jetson and other ARM boards
        info["board"] = model.read_text(errors="ignore").strip("\x00 \n")
    nvp = Path("/etc/nvpmodel.conf")
    if nvp.exists():
        info["power_mode"] = _jetson_power_mode()
    if platform.system() == "Darwin":
        info["mac_ver"] = platform.mac_ver()[0]
    return info


def _jetson_power_mode() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvpmodel"):
        try:
            out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout
            return " ".join(out.split())
        except (OSError, subprocess.SubprocessError):
            return None
    return None


class OpenVINORunner(Runner):
    """OpenVINO IR (``.xml`` + ``.bin``) or ONNX, compiled for the CPU (or ``device``)."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "CPU"):
        try:
            import openvino as ov
        except ImportError:
            raise MissingDependency("openvino", "pip install openvino") from None
        self.path = Path(path)
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise RdcdError(f"OpenVINO cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.threads = threads
        self.device = device
        self.version = ov.get_version()
        ps = self.compiled.input(0).get_partial_shape()
        self.fixed_batch = ps[0].get_length() if ps[0].is_static else None

    def _run(self, batch):
        res = self.request.infer({0: batch})
        return np.asarray(res[self.output], dtype=np.float32)

    def describe(self):
        return {"runtime": self.name, "version": self.version, "device": self.device, "threads": self.threads}


class CoreMLRunner(Runner):
    """A Core ML ``.mlpackage`` with an RGB image input; predicts only on macOS."""

    name = "coreml"

    def __init__(self, path: str | os.PathLike, compute_units: str = "ALL"):
        from rdcd.errors import RuntimeUnavailable

        try:
            import coremltools as ct
        except ImportError:
            raise MissingDependency("coremltools", "pip install coremltools") from None
        self.path = Path(path)
        self.version = ct.__version__
        if platform.system() != "Darwin":
            raise RuntimeUnavailable("Core ML prediction runs only on macOS (conversion works everywhere)")
        try:
            self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, compute_units))
        except Exception as exc:
            raise RdcdError(f"Core ML cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        spec = self.model.get_spec()
        self.input_name = spec.description.input[0].name
        self.output_name = spec.description.output[0].name
        self.compute_units = compute_units

    def _run(self, batch):
        from PIL import Image

        outs = []
        for img in batch:  # image inputs are fed one PIL image at a time
            res = self.model.predict({self.input_name: Image.fromarray(img, "RGB")})
            outs.append(np.asarray(res[self.output_name], dtype=np.float32).reshape(-1))
        return np.stack(outs)

    def describe(self):
        return {"runtime": self.name, "version": self.version, "compute_units": self.compute_units}


class TensorRTRunner(Runner):
    """A serialized TensorRT engine (TensorRT >= 10 Python API, CUDA memory via cuda-python)."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike):
        raise MissingDependency("TensorRT runner", "not implemented yet")
