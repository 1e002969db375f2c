"""Static post-training quantization of the FP32 ONNX model to an explicit QDQ ONNX model.

Two engines produce QDQ graphs: ONNX Runtime's quantization tools (``quantize_static``, QDQ format,
per-channel weights) and NNCF (``nncf.quantize`` on the ONNX model). Two activation formats matter:

* **ORT CPU model** (``model.int8.onnx``): uint8 activations with a zero point (ONNX Runtime's recommended
  x86 format) so that ReLU6/Clip folds into the quantizer and every Conv/Add becomes a QLinear kernel, and
  per-channel int8 weights, 7-bit on the stem (or on every layer) because ORT's u8s8 kernels on AVX2 without
  VNNI saturate 16-bit intermediates (``reduce_range``). Symmetric int8 activations keep a float Clip between
  every QDQ pair: that model ran slower than FP32 on this CPU (see docs/reports/quantize.md).
* **TensorRT input** (``tensorrt/model-int8.onnx``): symmetric int8 activations (zero point 0, which
  TensorRT's explicit quantization requires) and full-range per-channel int8 weights; its µAP is measured in
  ONNX Runtime with QDQ reference semantics (graph optimisations off: DequantizeLinear -> float op ->
  QuantizeLinear), which is what TensorRT computes up to accumulation order.

The uint8 input, its Cast/normalisation head and the GeM/L2 tail stay float. Layers can be kept in float by
name (``nodes_to_exclude`` / NNCF ``IgnoredScope``) for the fallback loop. No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rdcd.errors import MissingDependency, RdcdError
from rdcd.fsutil import atomic_path, temp_prefix
from rdcd.quantize.qdq_graph import ensure_node_names, float_nodes, layer_nodes, load_onnx, quant_units, scalarize_head

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
ENGINES = ("ort", "nncf")
CALIB_FLUSH = 16


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency("onnxruntime", "pip install onnxruntime") from None
    return onnxruntime


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to quantize: engine, calibration method and the activation/weight format."""

    engine: str = "ort"
    method: str = "minmax"
    activations: str = "asymmetric"  # "asymmetric" (uint8 + zero point) | "symmetric" (int8, zero point 0)
    #: 7-bit weights, which avoid the u8s8 16-bit saturation of ONNX Runtime's x86 kernels without VNNI:
    #: "all" layers, only the "first" (the stem sees the full 0..255 image range: NNCF's overflow fix does
    #: the same), or "none"
    reduce_range: str = "first"
    per_channel: bool = True
    percentile: float = 99.999

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise RdcdError(f"unknown engine {self.engine!r}: choose from {', '.join(ENGINES)}")
        if self.method not in METHODS:
            raise RdcdError(f"unknown calibration method {self.method!r}: choose from {', '.join(METHODS)}")
        if isinstance(self.reduce_range, bool):
            object.__setattr__(self, "reduce_range", "all" if self.reduce_range else "none")
        if self.reduce_range not in ("all", "first", "none"):
            raise RdcdError(f"reduce_range must be all, first or none, not {self.reduce_range!r}")
        if self.activations not in ("asymmetric", "symmetric"):
            raise RdcdError(f"activations must be asymmetric or symmetric, not {self.activations!r}")
        if self.engine == "nncf" and self.method == "entropy":
            raise RdcdError("entropy calibration is an ONNX Runtime method: use --engine ort, or --method "
                            "minmax/percentile with NNCF")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def tensorrt(cls, method: str = "minmax", engine: str = "ort") -> "Recipe":
        return cls(engine=engine, method=method, activations="symmetric", reduce_range="none")


# ---------------------------------------------------------------------------------------- quantizer
class OnnxQuantizer:
    """Quantizes one FP32 ONNX model repeatedly (calibration statistics cached between calls)."""

    def __init__(self, fp32_path: str | os.PathLike, calib_images: np.ndarray, keep_tail_float: bool = True,
                 workdir: str | os.PathLike | None = None):
        onnx = load_onnx()
        self.fp32_path = Path(fp32_path)
        if not self.fp32_path.is_file():
            raise RdcdError(f"FP32 ONNX model not found: {self.fp32_path}")
        if calib_images is None or len(calib_images) == 0:
            raise RdcdError("no calibration images: refusing to quantize with made-up scales")
        self.calib = np.ascontiguousarray(calib_images, dtype=np.uint8)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=temp_prefix("quantize-work"))
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pre_path = self.workdir / "model.pre.onnx"
        self._preprocess()
        model = onnx.load(str(self.pre_path))
        self.input_name = model.graph.input[0].name
        self.float_nodes = float_nodes(model, keep_tail_float)
        self.units = quant_units(model, self.float_nodes)  # unit name -> node names (weight layers by module)
        self.layers = layer_nodes(model)  # weight layer name -> node name
        self.keep_tail_float = keep_tail_float

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _preprocess(self) -> None:
        onnx = load_onnx()
        model = onnx.load(str(self.fp32_path))
        ensure_node_names(model)
        named = self.workdir / "model.named.onnx"
        onnx.save(model, str(named))
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            # symbolic shape inference cannot follow the L2-normalisation's Expand; ONNX shape inference can
            quant_pre_process(str(named), str(self.pre_path), skip_symbolic_shape=True)
        except ImportError:
            raise MissingDependency("onnxruntime", "pip install onnxruntime") from None
        except Exception as exc:  # pre-processing is an optimisation: keep going without it
            log.warning("quant_pre_process failed (%s): quantizing the exported graph as it is", exc)
            shutil.copyfile(named, self.pre_path)
        model = onnx.load(str(self.pre_path))
        if scalarize_head(model):
            onnx.save(model, str(self.pre_path))

    def node_names(self, units: Iterable[str]) -> list[str]:
        units = list(units)
        unknown = [u for u in units if u not in self.units]
        if unknown:
            raise RdcdError(f"unknown layer(s) {', '.join(unknown[:3])}: the model's layers are e.g. "
                            f"{', '.join(list(self.units)[:3])}")
        return list(dict.fromkeys(n for u in units for n in self.units[u]))

    def quantize(self, out_path: str | os.PathLike, recipe: Recipe, exclude_layers: Sequence[str] = ()) -> Path:
        exclude = self.float_nodes + self.node_names(exclude_layers)
        out_path = Path(out_path)
        with atomic_path(out_path) as tmp:
            if recipe.engine == "ort":
                self._quantize_ort(tmp, recipe, exclude)
            else:
                self._quantize_nncf(tmp, recipe, exclude)
        return out_path

    def _quantize_ort(self, out: Path, recipe: Recipe, exclude: list[str]) -> None:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        images, name = self.calib, self.input_name

        class Reader(CalibrationDataReader):
            # batch 1: the histogram calibrators stack per-batch arrays and need equal batch sizes
            def __init__(self):
                self._it = iter(range(len(images)))

            def get_next(self):
                i = next(self._it, None)
                return None if i is None else {name: images[i: i + 1]}

            def __len__(self):
                return len(images)

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[recipe.method]
        sym = recipe.activations == "symmetric"
        # histogram calibrators keep every intermediate output until told to fold them into the histograms:
        # flush every CALIB_FLUSH images (300 images of lite0 at 224 px otherwise hold ~18 GB)
        extra = {"ActivationSymmetric": sym, "WeightSymmetric": True, "CalibMovingAverage": False,
                 "CalibMaxIntermediateOutputs": CALIB_FLUSH}
        if recipe.method == "percentile":
            extra["CalibPercentile"] = recipe.percentile
        if recipe.reduce_range == "first" and recipe.engine == "ort":
            first = self.first_weight()
            if first:
                extra["TensorQuantOverrides"] = {first: [{"axis": 0, "reduce_range": True}]}
        cache = self.workdir / f"calib-{recipe.method}-{recipe.percentile if recipe.method == 'percentile' else ''}.json"
        if recipe.method == "entropy" and not cache.exists():
            self._entropy_ranges(Reader(), cache)
        quantize_static(str(self.pre_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=recipe.per_channel, reduce_range=recipe.reduce_range == "all",
                        activation_type=QuantType.QInt8 if sym else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=exclude,
                        extra_options=extra, calibration_cache_path=str(cache))  # onnxruntime >= 1.32

    def first_weight(self) -> str | None:
        """The weight initializer of the first convolution (the one that reads the image)."""
        onnx = load_onnx()
        model = onnx.load(str(self.pre_path), load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in inits:
                return node.input[1]
        return None

    def _entropy_ranges(self, reader, cache: Path) -> None:
        """KL-divergence (entropy) ranges with TensorRT's histogram sizes (2048 bins, 128 quantized bins).

        ``quantize_static`` builds its entropy calibrator with 128 bins *and* 128 quantized bins, which leaves
        one candidate threshold: the full range, i.e. exactly MinMax (measured: identical scales on every
        tensor). So the ranges are computed here with ORT's own calibrator and handed to ``quantize_static``
        through its calibration cache."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

        calibrator = create_calibrator(self.pre_path, [], augmented_model_path=str(self.workdir / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": 2048, "num_quantized_bins": 128,
                                                      "symmetric": False, "max_intermediate_outputs": CALIB_FLUSH})
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)

    def _quantize_nncf(self, out: Path, recipe: Recipe, exclude: list[str]) -> None:
        onnx = load_onnx()
        try:
            import nncf
        except ImportError:
            raise MissingDependency("nncf", "pip install 'rdcd[openvino]' (or use --engine ort)") from None
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        model = onnx.load(str(self.pre_path))
        images, name = self.calib, self.input_name
        ds = nncf.Dataset([images[i: i + 1] for i in range(len(images))], lambda x: {name: x})
        preset = nncf.QuantizationPreset.PERFORMANCE if recipe.activations == "symmetric" else nncf.QuantizationPreset.MIXED
        ranges = RangeEstimatorParametersSet.MINMAX if recipe.method == "minmax" else RangeEstimatorParametersSet.MEAN_QUANTILE
        adv = AdvancedQuantizationParameters(activations_range_estimator_params=ranges)
        from rdcd.logs import library_stdout

        try:
            with library_stdout():  # NNCF's progress bars
                q = nncf.quantize(model, ds, preset=preset, subset_size=len(images),
                                  ignored_scope=nncf.IgnoredScope(names=exclude, validate=False),
                                  advanced_parameters=adv)
        except Exception as exc:
            raise RdcdError(f"NNCF could not quantize {self.fp32_path.name}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc  # RDCD_DEBUG=1 shows it
        onnx.save(q, str(out))
