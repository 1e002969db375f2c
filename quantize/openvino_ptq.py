"""OpenVINO INT8 via NNCF: ``nncf.quantize`` on the OpenVINO model, saved as IR (``model.xml`` + ``.bin``).

The OpenVINO converter names each op after the ONNX node it came from (``node_Conv_880`` becomes
``node_Conv_880/WithoutBiases`` + ``node_Conv_880``), so the float head/tail and the fallback layers are kept in
float with an NNCF ``IgnoredScope`` built from the same ONNX node names. No torch here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rdcd.errors import MissingDependency, RdcdError
from rdcd.fsutil import atomic_path

log = logging.getLogger(__name__)


#: Measured (docs/reports/quantize.md): with NNCF's default (first layer only) the same INT8 IR gave different
#: descriptors on this CPU with and without VNNI (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``: mean cosine to FP32 0.87
#: vs 0.92); with ``enable`` both ISAs give identical results, so the µAP the gate measures is the one every CPU gets.
OVERFLOW_FIX = "enable"


def _imports():
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise MissingDependency(exc.name or "openvino/nncf", "pip install 'rdcd[openvino]'") from None
    return ov, nncf


def ov_names(model, onnx_nodes: Iterable[str]) -> list[str]:
    """OpenVINO op names that stem from the given ONNX node names, plus everything downstream of a named
    op that follows the last MatMul / convolution (the float tail).

    The converter does not keep every ONNX name: ``Div(x, Expand(Clip(ReduceL2(x))))``, the L2
    normalisation, becomes one ``Divide_<n>`` once the Expand is folded. Matched by name alone, that
    Divide stayed quantizable and NNCF put 8-bit FakeQuantize ops on both its inputs, the projector output
    and the *norm*, so INT8 descriptors were no longer unit length (norms 0.96-1.5 measured) and scores
    stopped being comparable across queries; no fallback step could undo it, as the op had no ONNX name."""
    wanted = set(onnx_nodes)
    ops = model.get_ordered_ops()
    weighted = ("MatMul", "Convolution", "GroupConvolution")  # the tail starts after the last op with weights
    last_weighted = max((i for i, op in enumerate(ops) if op.get_type_name() in weighted), default=-1)
    out, tail = [], set()
    for i, op in enumerate(ops):
        name = op.get_friendly_name()
        named = name in wanted or name.split("/", 1)[0] in wanted
        fed_by_tail = any(inp.get_source_output().get_node().get_friendly_name() in tail for inp in op.inputs())
        if named or (fed_by_tail and op.get_type_name() not in ("Result", "Constant")):
            out.append(name)
            if i > last_weighted:
                tail.add(name)
    return out


class OpenVINOQuantizer:
    def __init__(self, source: str | os.PathLike, calib_images: np.ndarray):
        ov, _ = _imports()
        self.source = Path(source)
        if not self.source.exists():
            raise RdcdError(f"OpenVINO source model not found: {self.source}")
        if calib_images is None or len(calib_images) == 0:
            raise RdcdError("no calibration images: refusing to quantize with made-up scales")
        self.calib = np.ascontiguousarray(calib_images, dtype=np.uint8)
        self.core = ov.Core()

    def read(self):
        try:
            return self.core.read_model(str(self.source))
        except Exception as exc:
            raise RdcdError(f"OpenVINO cannot read {self.source}: {str(exc).splitlines()[0]}") from None

    def quantize(self, out_xml: str | os.PathLike, onnx_float_nodes: Sequence[str], method: str = "minmax",
                 overflow_fix: str = OVERFLOW_FIX) -> Path:
        """Quantize and write ``out_xml`` (its folder is replaced atomically). ``overflow_fix``: NNCF's
        ``OverflowFix`` (``enable``: 7-bit weights in every layer, so that CPUs without VNNI, whose u8 x s8
        multiply-adds saturate in int16, compute what CPUs with VNNI compute)."""
        ov, nncf = _imports()
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        model = self.read()
        ignored = ov_names(model, onnx_float_nodes)
        images = self.calib
        ds = nncf.Dataset([images[i: i + 1] for i in range(len(images))])
        ranges = RangeEstimatorParametersSet.MINMAX if method == "minmax" else RangeEstimatorParametersSet.MEAN_QUANTILE
        from rdcd.logs import library_stdout

        try:
            with library_stdout():  # NNCF's progress bars
                q = nncf.quantize(model, ds, preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
                                  ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                                  advanced_parameters=AdvancedQuantizationParameters(
                                      activations_range_estimator_params=ranges,
                                      overflow_fix=OverflowFix(overflow_fix)))
        except Exception as exc:
            raise RdcdError(f"NNCF could not quantize {self.source.name} for OpenVINO: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc  # RDCD_DEBUG=1 shows it
        out_xml = Path(out_xml)
        with atomic_path(out_xml.parent, suffix="") as tmp:
            tmp.mkdir(parents=True)
            ov.save_model(q, str(tmp / out_xml.name), compress_to_fp16=False)
        return out_xml


def count_fake_quantize(xml: str | os.PathLike) -> int:
    ov, _ = _imports()
    model = ov.Core().read_model(str(xml))
    return sum(1 for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize")
