"""``rdcd-export --whiten-on DIR``: a PCA-whitening fitted on a user's own images, folded into the projector."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from rdcd.export.cli import main  # noqa: E402
from rdcd.manifest import Manifest  # noqa: E402

DIM, SIZE = 16, 64


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    from rdcd.model import StudentConfig, build_student, save_student

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "student16"
    save_student(build_student(StudentConfig(dim=DIM, input_size=SIZE), pretrained=True).eval(), run)
    return run


@pytest.fixture(scope="module")
def photos(skimage_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("refs")
    for p in sorted(skimage_dir.iterdir()):
        if p.suffix in (".png", ".jpg") and p.stat().st_size > 2000:
            shutil.copy(p, d / p.name)
    (d / "broken.jpg").write_bytes(b"not an image")
    assert len(list(d.iterdir())) > DIM + 2
    return d


def _projector_outputs(student, paths):
    from rdcd.validate.extract import load_images

    batch, _ = load_images(paths, student.config.preprocess(), skip_bad=True)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        f = student.fc(student.pool(student.backbone.forward_features((x - student.mean) / student.std)))
        return student.projector(f).double()


def test_folded_whitening_whitens_the_fit_images(small_run, photos):
    from rdcd.imageio import list_images
    from rdcd.model import fold_whitening, load_student

    paths = list_images(photos)
    st = load_student(small_run)
    before = _projector_outputs(st, paths)
    fit = fold_whitening(st, paths, shrinkage=0.0)
    assert fit["skipped"] == 1 and fit["images"] == len(paths) - 1
    y = _projector_outputs(st, paths)
    cov = torch.cov(y.T)
    assert torch.allclose(y.mean(0), torch.zeros(DIM, dtype=y.dtype), atol=1e-3)
    assert torch.allclose(cov, torch.eye(DIM, dtype=y.dtype), atol=2e-2)  # whitened on exactly these images
    assert not torch.allclose(torch.cov(before.T), torch.eye(DIM, dtype=y.dtype), atol=0.1)


def test_export_whiten_on_records_the_folder_and_matches_torch(small_run, photos, tmp_path):
    import onnxruntime as ort

    from rdcd.export.source import folder_sha256
    from rdcd.imageio import list_images
    from rdcd.model import TorchEmbedder, fold_whitening, load_student
    from rdcd.preprocess import PreprocessSpec

    out = tmp_path / "exp"
    assert main(["--checkpoint", str(small_run), "--target", "onnx", "--out", str(out), "--whiten-on", str(photos)]) == 0
    m = Manifest.load(out)
    w = m.source.whitening
    assert w["folder_sha256"] == folder_sha256(list_images(photos)) and w["images"] == len(list_images(photos)) - 1
    good = [p for p in list_images(photos) if p.name != "broken.jpg"]
    imgs = PreprocessSpec(size=SIZE).load_batch(good[:4])
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["descriptor"], {"image": imgs})[0]
    st = load_student(small_run)
    plain = TorchEmbedder(st)(imgs)
    fold_whitening(st, list_images(photos))
    want = TorchEmbedder(st)(imgs)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - plain).max() > 0.05  # the whitening changed the descriptor


def test_whiten_on_too_few_images_is_one_line_exit_2(small_run, tmp_path, skimage_dir, capsys):
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(skimage_dir / "coffee.png", few / "coffee.png")
    code = main(["--checkpoint", str(small_run), "--target", "onnx", "--out", str(tmp_path / "e"), "--whiten-on", str(few)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "at least 17 readable images" in err[0]
    assert not (tmp_path / "e").exists()
