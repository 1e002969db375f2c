"""Shared fixtures: real images from scikit-image, a tiny DISC benchmark, a tiny real student run.

Nothing here needs ../shared: benchmarks are built from the photos scikit-image ships.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

#: Tests use small inputs so that real models stay fast on a 2-core CPU.
TEST_SIZE = 96


@pytest.fixture(scope="session")
def skimage_dir() -> Path:
    skimage = pytest.importorskip("skimage")
    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory) -> Path:
    """The skimage demo benchmark (about 28 references, 28 queries, 18 training images)."""
    from rdcd.validate.demo import DemoConfig, build_demo

    return build_demo(tmp_path_factory.mktemp("bench") / "demo", DemoConfig(source="skimage", seed=0))


@pytest.fixture(scope="session")
def student_run(tmp_path_factory) -> Path:
    """A saved 128-d EfficientNet-Lite0 student (offline ImageNet init, untrained head) at TEST_SIZE."""
    import torch

    from rdcd.model import StudentConfig, build_student, save_student

    torch.manual_seed(0)
    cfg = StudentConfig(backbone="efficientnet_lite0", dim=128, input_size=TEST_SIZE)
    run = tmp_path_factory.mktemp("runs") / "student"
    save_student(build_student(cfg, pretrained=True).eval(), run, extra={"note": "test fixture"})
    return run


def student_onnx(student_run: Path) -> Path:
    """The ``student_run`` exported to ONNX once per session (the file lives beside the run, so every test
    module that needs it shares one export)."""
    out = student_run.parent / f"onnx-{TEST_SIZE}" / "model.onnx"
    if not out.exists():
        from rdcd.export.onnx_export import export_onnx
        from rdcd.model import load_student

        export_onnx(load_student(student_run), out, TEST_SIZE)
    return out


def make_exports(folder: Path, rows: list[dict], files: dict[str, Path]) -> Path:
    """``folder`` as an export directory: the model ``files`` (hard links, else copies) and a ``manifest.json``
    listing ``rows`` (manifest fields; input/output/produced_by/status default to a TEST_SIZE, 128-d artifact)."""
    import shutil

    from rdcd.manifest import Artifact, Input, Manifest, Output

    folder.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        dst = folder / name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    man = Manifest(folder)
    man.preprocess = {"size": TEST_SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "stretch-bilinear"}
    for r in rows:
        man.upsert(Artifact.from_dict({"input": Input.square(TEST_SIZE).to_dict(), "output": Output(dim=128).to_dict(),
                                       "produced_by": {"tool": "tests"}, "status": "ok", **r}))
    man.save()
    return folder


def row(name, target, precision, path, runtime, **kw) -> dict:
    """A manifest row's own fields, for :func:`make_exports`."""
    return {"name": name, "target": target, "precision": precision, "path": path, "runtime": runtime, **kw}


def onnx_export_dir(student_run: Path, folder: Path) -> Path:
    """``folder`` as a one-artifact export directory: the session's student ONNX (``onnx-fp32``) and its
    ``manifest.json``, as rdcd-export would write them (without running the exporter)."""
    return make_exports(folder, [row("onnx-fp32", "onnx", "fp32", "model.onnx", "onnxruntime")],
                        {"model.onnx": student_onnx(student_run)})


def fake_trtexec(bin_dir: Path, version: str, log: Path) -> dict:
    """A stand-in ``trtexec`` that reports TensorRT ``version`` and logs its command lines to ``log``
    (for testing the build scripts rdcd writes; not TensorRT). Returns an environment with it on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "trtexec"
    exe.write_text("#!/bin/sh\n"
                   f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec $*"\n'
                   f'[ "$1" = "--help" ] && exit 0\necho "trtexec $*" >> "{log}"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A real (tiny) TorchScript descriptor model standing in for Meta's SSCD TorchScript file."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Linear(16, 24)

        def forward(self, x):
            x = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.fc(x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1.0 / 3))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny.torchscript.pt"
    torch.jit.trace(Tiny().eval(), torch.rand(1, 3, 64, 64)).save(str(path))
    return path
