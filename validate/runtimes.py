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
from rdcd.validate.cuda import cuda_backend


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
    """An ONNX Runtime session (the one onnxruntime runner: gate, bench, export parity, rdcd-quantize).

    ``reference=True`` runs a QDQ model with float semantics (no graph optimisation, so no integer
    kernels): the prediction for TensorRT, which rdcd-quantize and the parity checks use.
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None,
                 reference: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependency("onnxruntime", "pip install onnxruntime") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise RdcdError(f"ONNX model not found: {self.path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if reference
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.threads = threads
        self.reference = reference
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


def static_input_size(runner) -> int | None:
    """The square input side a runner's model fixes (``[N, S, S, 3]`` with a static S), else None."""
    shape = getattr(runner, "input_shape", None)
    if shape is None and hasattr(runner, "compiled"):  # OpenVINO
        try:
            ps = runner.compiled.input(0).get_partial_shape()
            shape = [d.get_length() if d.is_static else None for d in ps]
        except Exception:  # noqa: BLE001 - best effort only
            shape = None
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0 and shape[1] == shape[2]:
        return int(shape[1])
    return None


def load_runner(path: str | os.PathLike, runtime: str = "auto", threads: int | None = None) -> Runner:
    """A runner for an artifact: ``.onnx`` -> onnxruntime (or TensorRT/OpenVINO when asked),
    ``.xml`` -> OpenVINO, ``.engine``/``.plan`` -> TensorRT, ``.mlpackage``/``.mlmodel`` -> Core ML."""
    path = Path(path)
    if not path.exists():
        raise RdcdError(f"model not found: {path}")
    from rdcd.targets import BY_RUNTIME, RUNTIMES, for_file

    if runtime == "auto":
        target = for_file(path.suffix)
        if target is None:
            raise RdcdError(f"cannot tell the runtime for {path.name}: pass --runtime")
    elif runtime in BY_RUNTIME:
        target = BY_RUNTIME[runtime]
    else:
        raise RdcdError(f"unknown runtime {runtime!r}: choose from auto, {', '.join(RUNTIMES)}")
    return target.function("runner")(path, threads=threads)  # threads: CPU runtimes' intra-op threads


class OpenVINORunner(Runner):
    """OpenVINO IR (``.xml`` + ``.bin``) or ONNX, compiled for the CPU (or ``device``).

    ``precision_hint`` sets ``INFERENCE_PRECISION_HINT`` (``"f32"`` for parity checks: CPUs with
    AMX/AVX512-BF16 otherwise run in bf16); ``None`` keeps the device's default, as deployed.
    """

    name = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "CPU",
                 precision_hint: str | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise MissingDependency("openvino", "pip install openvino") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise RdcdError(f"OpenVINO model not found: {self.path}")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        try:
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise RdcdError(f"OpenVINO cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.threads = threads
        self.device = device
        self.precision_hint = precision_hint
        self.version = ov.get_version()
        ps = self.compiled.input(0).get_partial_shape()
        self.fixed_batch = ps[0].get_length() if ps[0].is_static else None

    def _run(self, batch):
        res = self.request.infer({0: batch})
        return np.asarray(res[self.output], dtype=np.float32)

    def describe(self):
        return {"runtime": self.name, "version": self.version, "device": self.device, "threads": self.threads,
                "precision_hint": self.precision_hint}


class CoreMLRunner(Runner):
    """A Core ML ``.mlpackage`` with an RGB image input; predicts only on macOS."""

    name = "coreml"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, compute_units: str = "ALL"):
        from rdcd.errors import RuntimeUnavailable

        self.path = Path(path)
        if platform.system() != "Darwin":  # checked first: importing coremltools pulls in torch on Linux
            raise RuntimeUnavailable("Core ML prediction runs only on macOS (conversion works everywhere)")
        try:
            import coremltools as ct
        except ImportError:
            raise MissingDependency("coremltools", "pip install coremltools") from None
        self.version = ct.__version__
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
    """A serialized TensorRT engine (TensorRT >= 10 tensor API), CUDA memory via cuda-python or pycuda.

    The engine's input is the uint8 NHWC ``image`` of the ONNX artifact; engines with a dynamic batch
    are run in chunks no larger than their optimisation profile's maximum. Raises
    :class:`MissingDependency` without ``tensorrt`` and :class:`RuntimeUnavailable` without a GPU.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import tensorrt as trt
        except ImportError:
            raise MissingDependency("tensorrt", "needs an NVIDIA GPU: pip install tensorrt, or use the one "
                                    "JetPack ships") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise RdcdError(f"TensorRT engine not found: {self.path}")
        self.trt = trt
        self.version = trt.__version__
        self.cuda = cuda_backend()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RdcdError(f"TensorRT cannot deserialize {self.path}: built with another TensorRT version "
                            "or for another GPU? Rebuild it on this device (tensorrt/build_engine.sh)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise RdcdError(f"{self.path}: expected one input and an output, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        if in_dtype != np.uint8:
            raise RdcdError(f"{self.path}: input {self.input_name!r} is {in_dtype}, expected uint8 NHWC")
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if shape[0] == -1:
            self.max_batch = int(tuple(self.engine.get_tensor_profile_shape(self.input_name, 0)[2])[0])
        else:
            self.max_batch = int(shape[0])
            self.fixed_batch = self.max_batch
        self.input_shape = shape
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr

    def _run(self, batch):
        if len(batch) > self.max_batch:
            return np.concatenate([self._run(batch[i: i + self.max_batch])
                                   for i in range(0, len(batch), self.max_batch)])
        if tuple(batch.shape[1:]) != tuple(self.input_shape[1:]):
            raise RdcdError(f"{self.path.name} takes {tuple(self.input_shape[1:])} images, got {batch.shape[1:]}")
        if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise RdcdError(f"{self.path.name}: batch {batch.shape[0]} is outside the engine's profile")
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = np.empty(out_shape, dtype=self.out_dtype)
        d_in = self._buffer(self.input_name, batch.nbytes)
        d_out = self._buffer(self.output_name, out.nbytes)
        self.context.set_tensor_address(self.input_name, d_in)
        self.context.set_tensor_address(self.output_name, d_out)
        self.cuda.htod(d_in, batch)
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise RdcdError(f"TensorRT execution failed for {self.path.name}")
        self.cuda.dtoh(out, d_out)
        self.cuda.synchronize()
        return out.astype(np.float32, copy=False)

    def describe(self):
        return {"runtime": self.name, "version": self.version, "max_batch": self.max_batch}

    def __del__(self):
        try:
            for ptr, _ in self._buffers.values():
                self.cuda.free(ptr)
            self.cuda.close()
        except Exception:
            pass
