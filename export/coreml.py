"""Core ML export: an ``mlprogram`` ``.mlpackage`` with an RGB image input named ``image``.

The model's normalisation is folded into Core ML's image preprocessing (``y = scale * pixel +
bias``) when it can be exactly (one std for all channels, as for EfficientNet-Lite's [-1, 1]);
otherwise the image is scaled to [0, 1] and the normalisation stays in the graph. FP16 by
default, iOS 16+ (iOS 17 when activations are quantized, as the quantize stage does).

Core ML predicts only on macOS. Elsewhere :func:`verify` checks what can be checked: the spec's
input/output names, types and shapes, that the saved MIL program parses back, and that the
PyTorch program that was converted (including the folded preprocessing) matches the original.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rdcd.errors import MissingDependency, RdcdError
from rdcd.fsutil import atomic_path

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")


@contextlib.contextmanager
def _quiet():
    """coremltools warns about untested torch/sklearn versions and draws progress bars: hide them."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # tqdm bars go to stderr
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def import_ct():
    with _quiet():
        try:
            import coremltools as ct
        except ImportError:
            raise MissingDependency("coremltools", "pip install coremltools") from None
    return ct


def deployment_target(ct, quantized_activations: bool = False):
    """iOS 16 for FP16/FP32 and weight-only compression; iOS 17 for quantized activations (W8A8)."""
    return ct.target.iOS17 if quantized_activations else ct.target.iOS16


def fold(net, spec) -> tuple[Any, float, list[float], bool]:
    """(module to convert, image scale, per-channel bias, folded?) for Core ML's image input."""
    import torch

    std, mean = spec.std, spec.mean
    if max(std) - min(std) < 1e-12 and hasattr(net, "mean") and hasattr(net, "std"):
        folded = copy.deepcopy(net).eval()
        with torch.no_grad():
            folded.mean.zero_()
            folded.std.fill_(1.0)
        return folded, 1.0 / (255.0 * std[0]), [-m / std[0] for m in mean], True
    return net, 1.0 / 255.0, [0.0, 0.0, 0.0], False


def emulate_image_input(batch_uint8: np.ndarray, scale: float, bias: list[float]) -> np.ndarray:
    """What Core ML feeds the program for an RGB image: ``scale * pixel + bias``, NCHW float32."""
    x = batch_uint8.astype(np.float32).transpose(0, 3, 1, 2) * np.float32(scale)
    return np.ascontiguousarray(x + np.asarray(bias, np.float32).reshape(1, 3, 1, 1))


def convert(source, path: str | os.PathLike, precision: str = "fp16", quantized_activations: bool = False) -> dict:
    """Convert ``source.net`` into ``path`` (``.mlpackage``); return what :func:`verify` needs."""
    import torch

    if precision not in PRECISIONS:
        raise RdcdError(f"Core ML precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    ct = import_ct()
    from rdcd import __version__

    path = Path(path)
    size = source.spec.size
    module, scale, bias, folded = fold(source.net, source.spec)
    example = torch.rand(1, 3, size, size)
    with _quiet(), torch.no_grad():
        if source.scripted:  # TorchScript inside: only the TorchScript frontend can take it
            program = torch.jit.trace(module, example, check_trace=False)
            converted = program
        else:  # torch.export handles timm's TF-"same" padding, which the TorchScript frontend cannot
            program = torch.export.export(module, (example,)).run_decompositions({})
            converted = program.module()
        target = deployment_target(ct, quantized_activations)
        try:
            mlmodel = ct.convert(
                program,
                inputs=[ct.ImageType(name="image", shape=(1, 3, size, size), scale=scale, bias=bias,
                                     color_layout=ct.colorlayout.RGB)],
                outputs=[ct.TensorType(name="descriptor", dtype=np.float32)],
                convert_to="mlprogram", minimum_deployment_target=target,
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
        except Exception as exc:
            raise RdcdError(f"Core ML conversion failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    mlmodel.author = "rdcd (RDCD distilled copy-detection descriptor)"
    mlmodel.short_description = (f"{source.label}: {size}x{size} RGB image -> L2-normalised {source.dim}-d copy-detection "
                                 "descriptor (compare with cosine / inner product)")
    mlmodel.version = __version__
    mlmodel.license = "see the rdcd project"
    mlmodel.input_description["image"] = f"RGB image, stretched to {size}x{size} (bilinear, antialiased)"
    mlmodel.output_description["descriptor"] = f"L2-normalised {source.dim}-d descriptor, shape [1, {source.dim}]"
    meta = mlmodel.user_defined_metadata
    for k, v in source.metadata().items():
        meta[k] = v
    meta["rdcd.precision"] = precision
    meta["rdcd.image_scale"] = repr(scale)
    meta["rdcd.image_bias"] = ",".join(repr(b) for b in bias)
    with atomic_path(path) as tmp, _quiet():
        mlmodel.save(str(tmp))
    target_name = getattr(target, "name", str(target))
    return {"scale": scale, "bias": bias, "folded": folded, "converted": converted, "deployment_target": target_name,
            "versions": {"coremltools": ct.__version__, "torch": torch.__version__},
            "options": {"convert_to": "mlprogram", "precision": precision, "minimum_deployment_target": target_name,
                        "image_scale": scale, "image_bias": bias, "normalisation_folded": folded,
                        "frontend": "torchscript" if source.scripted else "torch.export"}}


def verify(path: str | os.PathLike, source, info: dict, images: np.ndarray, reference: np.ndarray) -> dict:
    """Spec, MIL program and converted-model checks that need no macOS; raises RdcdError if one fails."""
    import torch

    from rdcd.export.parity import parity

    ct = import_ct()
    from coremltools.converters.mil.frontend.milproto import load as milproto

    path = Path(path)
    size, dim = source.spec.size, source.dim
    with _quiet():
        model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    problems = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"model type is {spec.WhichOneof('Type')}, not mlProgram")
    ins, outs = list(spec.description.input), list(spec.description.output)
    if len(ins) != 1 or ins[0].name != "image" or ins[0].type.WhichOneof("Type") != "imageType":
        problems.append(f"inputs are {[(i.name, i.type.WhichOneof('Type')) for i in ins]}, expected one image 'image'")
    else:
        it = ins[0].type.imageType
        if (it.width, it.height) != (size, size):
            problems.append(f"image input is {it.width}x{it.height}, expected {size}x{size}")
        if it.colorSpace != ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB:
            problems.append("image input is not RGB")
    if len(outs) != 1 or outs[0].name != "descriptor":
        problems.append(f"outputs are {[o.name for o in outs]}, expected 'descriptor'")
    else:
        shape = list(outs[0].type.multiArrayType.shape)
        if shape and shape != [1, dim]:
            problems.append(f"descriptor shape is {shape}, expected [1, {dim}]")
    min_version = 8 if info["deployment_target"] == "iOS17" else 7  # spec version 7 = iOS 16
    if spec.specificationVersion < min_version:
        problems.append(f"specification version {spec.specificationVersion} < {min_version}")
    if spec.description.metadata.userDefined.get("rdcd.dim") != str(dim):
        problems.append("rdcd.dim metadata missing")
    with _quiet():
        try:
            prog = milproto.load(spec, spec.specificationVersion, model.weights_dir)
            n_ops = len(prog.functions["main"].operations)
        except Exception as exc:
            problems.append(f"the saved MIL program does not load: {str(exc).splitlines()[0]}")
            n_ops = 0
    if problems:
        raise RdcdError("Core ML checks failed: " + "; ".join(problems))
    x = torch.from_numpy(emulate_image_input(images, info["scale"], info["bias"]))
    with torch.no_grad():
        out = torch.cat([info["converted"](x[i: i + 1]) for i in range(len(x))]).float().numpy()
    converted = parity(reference, out, runtime="torch (the converted program, image preprocessing emulated)")
    return {"spec": {"type": "mlProgram", "input": f"image RGB {size}x{size}", "output": f"descriptor [1, {dim}]",
                     "specification_version": spec.specificationVersion},
            "mil_program_ops": n_ops, "converted_torch": converted}
