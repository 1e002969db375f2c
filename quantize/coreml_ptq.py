"""Core ML INT8: W8A8 with ``coremltools.optimize.torch`` and weight-only W8 with ``coremltools.optimize.coreml``.

W8A8: the student is made FX-traceable at its fixed input size (timm's TF-"same" convolutions get their
padding computed once; BatchNorm is folded into the convolutions, checked numerically), prepared by
``LinearQuantizer`` (symmetric int8 weights per channel, uint8/int8 activations, min/max observers),
calibrated on the calibration images with fake quantization off, then run with fake quantization on: that
model *is* the simulation of what Core ML computes, and its µAP is reported as "simulated" on Linux.
``finalize`` gives the reference-quantized model that ``ct.convert`` turns into an iOS 17 ``mlprogram``
with quantized activations. The calibrated state (``simulation.safetensors`` + ``simulation.json``) is saved
next to the package so the simulation can be rebuilt (:func:`load_w8a8_simulation`) without calibrating again.

W8: ``linear_quantize_weights`` (symmetric, per channel) on a float Core ML model (the export's, or one
converted here); the simulation is ``PostTrainingQuantizer`` with the same settings on the PyTorch model.

Core ML prediction runs only on macOS; there, :func:`coreml_micro_ap` runs the real package instead.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from rdcd.errors import MissingDependency, RdcdError
from rdcd.fsutil import atomic_path, write_json
from rdcd.preprocess import to_float_nchw

log = logging.getLogger(__name__)

SIM_STATE = "simulation.safetensors"
SIM_CONFIG = "simulation.json"


def _ct():
    try:
        import coremltools as ct
    except ImportError:
        raise MissingDependency("coremltools", "pip install 'rdcd[coreml]'") from None
    return ct


# ---------------------------------------------------------------------------------- static student
def _is_dynamic_same_conv(m: nn.Module) -> bool:
    try:
        from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    except ImportError:  # pragma: no cover - old timm
        return False
    return isinstance(m, (Conv2dSame, Conv2dSameExport))


def _static_pad_conv(conv: nn.Conv2d, in_hw: tuple[int, int]) -> nn.Module:
    from timm.layers.padding import get_same_padding

    (ih, iw), (kh, kw) = in_hw, conv.weight.shape[-2:]
    ph = get_same_padding(ih, kh, conv.stride[0], conv.dilation[0])
    pw = get_same_padding(iw, kw, conv.stride[1], conv.dilation[1])
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                      conv.groups, conv.bias is not None)
    plain.load_state_dict(conv.state_dict())
    if ph == 0 and pw == 0:
        return plain
    return nn.Sequential(nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), plain)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _conv_of(m: nn.Module) -> nn.Conv2d | None:
    if type(m) is nn.Conv2d:
        return m
    if isinstance(m, nn.Sequential) and len(m) == 2 and type(m[1]) is nn.Conv2d:
        return m[1]
    return None


def make_static(student: nn.Module, size: int) -> tuple[nn.Module, dict[str, str]]:
    """An FX-traceable copy of ``student`` for ``size`` x ``size`` inputs, BatchNorm folded.

    Returns (model, {layer name: module path of its nn.Conv2d / nn.Linear}). Raises if the rewrite changes
    the descriptors.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(student).eval().float()
    # 1. TF-"same" convolutions: record each one's input size at this resolution, then pad statically
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if _is_dynamic_same_conv(m):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    for h in hooks:
        h.remove()
    layer_path: dict[str, str] = {}
    for name, hw in sizes.items():
        new = _static_pad_conv(model.get_submodule(name), hw)
        _set_module(model, name, new)
    model.eval()
    # 2. fold BatchNorm into the preceding convolution (children registered conv -> bn, as timm does)
    for parent_name, parent in list(model.named_modules()):
        children = list(parent.named_children())
        for (cname, cmod), (bname, bmod) in zip(children, children[1:]):
            conv = _conv_of(cmod)
            if conv is None or not isinstance(bmod, nn.BatchNorm2d) or bmod.num_features != conv.out_channels:
                continue
            fused = fuse_conv_bn_eval(conv, bmod)
            if isinstance(cmod, nn.Sequential):
                cmod[1] = fused
            else:
                setattr(parent, cname, fused)
            act = [getattr(bmod, a) for a in ("drop", "act")
                   if isinstance(getattr(bmod, a, None), nn.Module) and not isinstance(getattr(bmod, a), nn.Identity)]
            setattr(parent, bname, act[0] if len(act) == 1 else nn.Sequential(*act) if act else nn.Identity())
    with torch.no_grad():
        out = model(x)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1).min().item()
    if cos < 0.9999:
        raise RdcdError(f"making the student traceable for Core ML quantization changed its output (cos {cos:.5f})")
    for name, m in model.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            layer = name[:-2] if name.endswith(".1") and isinstance(model.get_submodule(name[:-2]), nn.Sequential) else name
            layer_path[layer] = name
    return model, layer_path


class SimEmbedder:
    """uint8 NHWC batches -> descriptors through a PyTorch model taking float NCHW in [0, 1]."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.name = "pytorch-simulation"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(_to_float(batch)).float().numpy()


def _to_float(batch: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] (:func:`rdcd.preprocess.to_float_nchw`) as a tensor."""
    return torch.from_numpy(to_float_nchw(batch))


# ------------------------------------------------------------------------------------------- W8A8
ACTIVATION_SCHEME = "affine"


def _w8a8_config(exclude_modules: Sequence[str]):
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig, ModuleLinearQuantizerConfig

    # affine activations: EfficientNet-Lite's ReLU6 outputs are non-negative, and a symmetric int8 grid spends
    # half its levels on values that never occur (measured on the demo benchmark, 1,120 pairs: symmetric
    # +0.0075 µAP drop that no number of float layers fixed, 51 layers kept float to hold; affine +0.0005)
    glob = ModuleLinearQuantizerConfig(quantization_scheme=ACTIVATION_SCHEME, activation_observer="min_max",
                                       weight_observer="min_max", weight_per_channel=True, milestones=None)
    return LinearQuantizerConfig(global_config=glob, module_name_configs={m: None for m in exclude_modules})


class W8A8:
    """A calibrated W8A8 simulation of one student (``prepared``), and its quantizer for conversion."""

    def __init__(self, static_model: nn.Module, size: int, exclude_modules: Sequence[str] = ()):
        try:
            from coremltools.optimize.torch.quantization import LinearQuantizer
        except ImportError:
            raise MissingDependency("coremltools", "pip install 'rdcd[coreml]'") from None
        self.size = size
        self.exclude_modules = list(exclude_modules)
        self.quantizer = LinearQuantizer(copy.deepcopy(static_model), _w8a8_config(self.exclude_modules))
        example = torch.rand(1, 3, size, size)
        try:
            self.prepared = self.quantizer.prepare(example_inputs=(example,))
        except Exception as exc:
            raise RdcdError(f"coremltools could not prepare the student for W8A8: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc  # RDCD_DEBUG=1 shows it
        self.prepared.eval()

    def calibrate(self, images: np.ndarray, batch_size: int = 16) -> "W8A8":
        from torch.ao import quantization as aoq

        if images is None or len(images) == 0:
            raise RdcdError("no calibration images: refusing to quantize with made-up scales")
        self.prepared.apply(aoq.enable_observer)
        self.prepared.apply(aoq.disable_fake_quant)
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                self.prepared(_to_float(images[i: i + batch_size]))
        self.prepared.apply(aoq.disable_observer)
        self.prepared.apply(aoq.enable_fake_quant)
        return self

    def embedder(self) -> SimEmbedder:
        return SimEmbedder(self.prepared)

    def save_simulation(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone().contiguous() for k, v in self.prepared.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        with atomic_path(directory / SIM_STATE) as tmp:
            save_file(state, str(tmp), metadata={"rdcd": "coreml-w8a8-simulation"})
        write_json(directory / SIM_CONFIG, {"kind": "w8a8", "size": self.size,
                                            "exclude_modules": self.exclude_modules,
                                            "quantizer": "coremltools.optimize.torch LinearQuantizer",
                                            "scheme": "symmetric", "observer": "min_max", **(extra or {})})
        return directory / SIM_STATE

    def convert(self, out_path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """finalize -> trace -> iOS 17 mlprogram with an RGB image input (scale 1/255) named ``image``."""
        ct = _ct()
        final = self.quantizer.finalize(self.prepared)
        final.eval()
        example = torch.rand(1, 3, self.size, self.size)
        with torch.no_grad():
            traced = torch.jit.trace(final, example, check_trace=False)
        return _convert(ct, traced, self.size, out_path, ct.target.iOS17, metadata,
                        description="RDCD copy-detection descriptor, W8A8 (int8 weights and activations)")


def load_w8a8_simulation(student: nn.Module, directory: str | os.PathLike) -> W8A8:
    """Rebuild the calibrated W8A8 simulation saved by :meth:`W8A8.save_simulation`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, state_path = directory / SIM_CONFIG, directory / SIM_STATE
    if not cfg_path.exists() or not state_path.exists():
        raise RdcdError(f"no W8A8 simulation in {directory} ({SIM_CONFIG} + {SIM_STATE})")
    cfg = json.loads(cfg_path.read_text())
    static, _ = make_static(student, int(cfg["size"]))
    sim = W8A8(static, int(cfg["size"]), cfg.get("exclude_modules", []))
    state = load_file(str(state_path))
    missing, unexpected = sim.prepared.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "activation_post_process" in m or "weight_fake_quant" in m]:
        raise RdcdError(f"W8A8 simulation state in {directory} does not match the student")
    from torch.ao import quantization as aoq

    sim.prepared.apply(aoq.disable_observer)
    sim.prepared.apply(aoq.enable_fake_quant)
    return sim


# --------------------------------------------------------------------------------------------- W8
def w8_simulation(static_model: nn.Module, exclude_modules: Sequence[str] = ()) -> nn.Module:
    """Weight-only int8 (symmetric, per channel) applied to the PyTorch model: what W8 Core ML computes."""
    from coremltools.optimize.torch.quantization import (ModulePostTrainingQuantizerConfig,
                                                         PostTrainingQuantizer, PostTrainingQuantizerConfig)

    glob = ModulePostTrainingQuantizerConfig(weight_dtype="int8", granularity="per_channel",
                                             quantization_scheme="symmetric")
    cfg = PostTrainingQuantizerConfig(global_config=glob, module_name_configs={m: None for m in exclude_modules})
    return PostTrainingQuantizer(copy.deepcopy(static_model), cfg).compress().eval()


def w8_config(exclude_ops: Sequence[str] = ()):
    ct = _ct()
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

    op = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                 weight_threshold=512)
    return OptimizationConfig(global_config=op, op_name_configs={n: None for n in exclude_ops})


def w8_from_mlmodel(src: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """linear_quantize_weights on an existing float mlpackage (works off macOS: no prediction needed)."""
    ct = _ct()
    try:
        mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
    except Exception as exc:
        raise RdcdError(f"coremltools cannot read {src}: {str(exc).splitlines()[0]}") from None
    q = ct.optimize.coreml.linear_quantize_weights(mlmodel, config=w8_config())
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".mlpackage") as tmp:
        q.save(str(tmp))
    return out_path


def w8_from_torch(static_model: nn.Module, size: int, out_path: str | os.PathLike,
                  metadata: dict | None = None) -> Path:
    """Convert the float student (FP16 mlprogram, iOS 16) and quantize its weights to int8."""
    ct = _ct()
    with torch.no_grad():
        traced = torch.jit.trace(static_model.eval(), torch.rand(1, 3, size, size), check_trace=False)
    tmp_pkg = Path(out_path).with_name(f".{Path(out_path).stem}.float.mlpackage")
    try:
        _convert(ct, traced, size, tmp_pkg, ct.target.iOS16, metadata,
                 description="RDCD copy-detection descriptor, W8 (int8 weights)")
        return w8_from_mlmodel(tmp_pkg, out_path)
    finally:
        import shutil

        shutil.rmtree(tmp_pkg, ignore_errors=True)


def _convert(ct, traced, size: int, out_path, target, metadata: dict | None, description: str) -> Path:
    try:
        mlmodel = ct.convert(traced, convert_to="mlprogram", minimum_deployment_target=target,
                             inputs=[ct.ImageType(name="image", shape=(1, 3, size, size), scale=1 / 255.0,
                                                  color_layout=ct.colorlayout.RGB)],
                             outputs=[ct.TensorType(name="descriptor")])
    except Exception as exc:
        raise RdcdError(f"Core ML conversion failed: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    mlmodel.author = "rdcd"
    mlmodel.short_description = description
    for k, v in (metadata or {}).items():
        mlmodel.user_defined_metadata[str(k)] = v if isinstance(v, str) else json.dumps(v)
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".mlpackage") as tmp:
        mlmodel.save(str(tmp))
    return out_path


def mlpackage_facts(path: str | os.PathLike) -> dict:
    """What can be checked off macOS: spec version, I/O, and how many weights/activations are quantized."""
    ct = _ct()
    m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    ops: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    return {"specification_version": spec.specificationVersion,
            "inputs": [i.name for i in spec.description.input], "outputs": [o.name for o in spec.description.output],
            "input_type": spec.description.input[0].type.WhichOneof("Type"),
            "quantize_ops": ops.get("quantize", 0), "dequantize_ops": ops.get("dequantize", 0),
            "constexpr_dequant_ops": sum(v for k, v in ops.items() if k.startswith("constexpr_")),
            "conv_ops": ops.get("conv", 0)}


def coreml_available() -> bool:
    return platform.system() == "Darwin"
