"""The student definition, its offline ImageNet init, checkpoints, and the teachers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdcd.errors import RdcdError
from rdcd.model import (DeployModel, StudentConfig, build_student, load_student, reparameterize, save_student,
                        verify_pretrained)
from rdcd.teacher import build_teacher


def test_offline_lite0_weights_classify_real_photos():
    res = verify_pretrained("efficientnet_lite0")
    assert res["ok"], res
    assert res["chelsea"]["prob"] > 0.5 and res["coffee"]["prob"] > 0.5


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_b0", "mobilenetv3_large_100", "fastvit_t12"])
def test_student_shapes(backbone):
    torch.manual_seed(0)
    s = build_student(StudentConfig(backbone=backbone, dim=64, input_size=64)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f, z = s.features(x)
        assert f.shape == (2, 512) and z.shape == (2, 64)
        assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
        if backbone == "fastvit_t12":  # train-time branches fuse for inference without changing outputs
            z2 = reparameterize(s)(x)
            assert torch.allclose(z, z2, atol=1e-3)


def test_deploy_model_takes_uint8_nhwc():
    s = build_student(StudentConfig(dim=32, input_size=64)).eval()
    img = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        a = DeployModel(s)(img)
        b = s(img.permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(a, b, atol=1e-6) and a.shape == (3, 32)


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = StudentConfig(backbone="efficientnet_lite0", dim=16, input_size=64)
    s = build_student(cfg).eval()
    run = tmp_path / "run"
    save_student(s, run, extra={"train": {"steps": 0}})
    loaded = load_student(run)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(s(x), loaded(x))
    assert load_student(run / "model.safetensors").config.dim == 16

    (run / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RdcdError, match="corrupt checkpoint"):
        load_student(run)
    with pytest.raises(RdcdError, match="checkpoint not found"):
        load_student(tmp_path / "missing")
    run2 = tmp_path / "run2"
    save_student(s, run2)
    import json

    cfg_path = run2 / "config.json"
    data = json.loads(cfg_path.read_text())
    data["model"]["dim"] = 32  # config says 32-d, weights are 16-d
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(RdcdError):
        load_student(run2)


def test_onnx_teacher_is_the_offline_sscd():
    t = build_teacher("sscd-onnx", size=160)
    assert t.dim == 512 and t.kind == "onnx"
    x = np.random.default_rng(0).integers(0, 256, (2, 160, 160, 3), dtype=np.uint8)
    e = t.embed_uint8(x)
    assert e.shape == (2, 512) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)
    te = t(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(te, torch.from_numpy(e), atol=1e-5)


def test_torchscript_teacher_file(tmp_path):
    """A user's SSCD TorchScript file (here a small scripted CNN with the same calling convention)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 512))
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.script(net).save(str(path))
    t = build_teacher(str(path), size=64)
    assert t.kind == "torchscript" and t.dim == 512
    t.module.train()  # whatever a caller does, the teacher runs in eval mode
    x = torch.rand(4, 3, 64, 64)
    a, b = t(x), t(x[:1])
    assert not t.module.training
    assert torch.allclose(a[:1], b, atol=1e-5)  # eval-mode BN: independent of the batch
    assert torch.allclose(a.norm(dim=1), torch.ones(4), atol=1e-5)


def test_teacher_spec_errors(tmp_path):
    with pytest.raises(RdcdError, match="teacher not found"):
        build_teacher(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(RdcdError, match="cannot load TorchScript"):
        build_teacher(str(bad))
