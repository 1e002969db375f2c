"""rdcd-distill's pieces without a training run: the SSCD views, the epoch batches of each rank, the lower
stages frozen, the learning-rate schedule, the offline backbone weights check."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("kornia")

from rdcd.distill import augment  # noqa: E402
from rdcd.distill.data import EpochBatches  # noqa: E402

SIZE = 64


def test_views_are_reproducible_and_use_every_sscd_op():
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut())
    every = augment.AugConfig(p_flip=1, p_rot90=1, p_text=1, p_emoji=1, p_rotate=1, p_jitter=1, p_gray=1, p_blur=1,
                              p_jpeg=1)
    a1, p1 = augment.make_canvas(im, augment.view_rng(0, "astronaut.png", 1, 3), 96, every)
    a2, p2 = augment.make_canvas(im, augment.view_rng(0, "astronaut.png", 1, 3), 96, every)
    b, pb = augment.make_canvas(im, augment.view_rng(0, "astronaut.png", 1, 4), 96, every)
    assert np.array_equal(a1, a2) and np.array_equal(p1, p2)
    assert not np.array_equal(a1, b)
    plain = np.asarray(im.resize((96, 96), Image.BILINEAR))
    assert not np.array_equal(a1, plain)
    P = augment.P
    assert p1[P["gray"]] == 1 and p1[P["blur_sigma"]] >= 1 and p1[P["jpeg_quality"]] >= 0
    canv = torch.from_numpy(np.stack([a1, b]))
    par = torch.from_numpy(np.stack([p1, pb]))
    x96, x48 = augment.apply_tensor_stage(canv, par, 96, [96, 48], every)
    again, _ = augment.apply_tensor_stage(canv, par, 96, [96, 48], every)
    assert x96.shape == (2, 3, 96, 96) and x48.shape == (2, 3, 48, 48)
    assert torch.equal(x96, again)
    assert float(x96.min()) >= 0 and float(x96.max()) <= 1
    # grayscale applied (JPEG afterwards leaves only small chroma differences)
    assert float((x96[:, 0] - x96[:, 1]).abs().mean()) < 0.01
    # the small view is the large one resized (the teacher and the student see the same view)
    down = torch.nn.functional.interpolate(x96, size=(48, 48), mode="bilinear", antialias=True).clamp(0, 1)
    assert torch.allclose(down, x48, atol=1e-6)


def test_epoch_batches_split_ranks_and_resume_offset():
    full = [b for b in EpochBatches(50, 8, 1, 0, seed=3, epoch=2)]
    assert len(full) == 6 and all(len(b) == 8 for b in full)
    r0 = list(EpochBatches(50, 8, 2, 0, seed=3, epoch=2))
    r1 = list(EpochBatches(50, 8, 2, 1, seed=3, epoch=2))
    for g, a, b in zip(full, r0, r1):
        assert a + b == g and not set(a) & set(b)
    assert list(EpochBatches(50, 8, 1, 0, seed=3, epoch=2, start=4)) == full[4:]
    assert list(EpochBatches(50, 8, 1, 0, seed=3, epoch=3)) != full
    flat = [i for b in full for i, _ in b]
    assert len(set(flat)) == 48  # each image at most once per epoch


def test_train_blocks_freezes_the_lower_stages_batchnorm_included():
    from rdcd.distill.student_utils import freeze_lower_stages, train_mode
    from rdcd.errors import RdcdError
    from rdcd.model import StudentConfig, build_student

    s = build_student(StudentConfig(input_size=SIZE), pretrained=False)
    n = len(s.backbone.blocks)
    frozen = freeze_lower_stages(s, 2)
    trainable = {k for k, p in s.backbone.named_parameters() if p.requires_grad}
    keep = (f"blocks.{n - 2}.", f"blocks.{n - 1}.", "conv_head.", "bn2.")
    assert trainable and all(k.startswith(keep) for k in trainable)
    assert not s.backbone.bn1.weight.requires_grad  # timm's BatchNormAct2d has children: frozen all the same
    train_mode(s, "train", frozen)
    assert not s.backbone.bn1.training and s.backbone.bn2.training and s.fc.training
    with pytest.raises(RdcdError, match="only"):
        freeze_lower_stages(build_student(StudentConfig(input_size=SIZE), pretrained=False), n + 1)


def test_lr_schedule_warmup_then_cosine_and_frozen_bn():
    from rdcd.distill.student_utils import lr_at, train_mode
    from rdcd.model import StudentConfig, build_student

    assert [lr_at(s, 1.0, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 1.0, 4, 14) == pytest.approx(1.0)
    assert lr_at(9, 1.0, 4, 14) == pytest.approx(0.5)
    assert lr_at(14, 1.0, 4, 14) == pytest.approx(0.0, abs=1e-12)
    s = build_student(StudentConfig(input_size=SIZE), pretrained=False)
    train_mode(s, "frozen")
    bns = [m for m in s.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and s.training and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    s.features(torch.rand(2, 3, SIZE, SIZE))
    assert torch.equal(before, bns[0].running_mean)  # frozen statistics stay put
    train_mode(s, "train")
    assert all(m.training for m in bns)


def test_backbone_weights_file_is_verified_on_real_photos(tmp_path):
    from safetensors.torch import save_file

    from rdcd.distill.init import init_from_file
    from rdcd.errors import RdcdError
    from rdcd.model import StudentConfig, build_student, imagenet_classifier

    good = tmp_path / "lite0.safetensors"  # the offline ImageNet weights, as a timm checkpoint file
    save_file({k: v.contiguous() for k, v in imagenet_classifier("efficientnet_lite0").state_dict().items()}, str(good))
    student = build_student(StudentConfig(input_size=SIZE), pretrained=False)
    check = init_from_file(student, "efficientnet_lite0", good)
    assert check["ok"] and check["chelsea"]["correct"] and check["coffee"]["correct"]
    ref = imagenet_classifier("efficientnet_lite0").state_dict()
    assert torch.equal(student.backbone.conv_stem.weight, ref["conv_stem.weight"])
    import timm

    torch.manual_seed(0)
    bad = tmp_path / "random.pth"  # right architecture, untrained: must be refused
    torch.save(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), bad)
    with pytest.raises(RdcdError, match="misclassifies real photos"):
        init_from_file(build_student(StudentConfig(input_size=SIZE)), "efficientnet_lite0", bad)
    with pytest.raises(RdcdError, match="does not fit"):
        init_from_file(build_student(StudentConfig(backbone="mobilenetv3_large_100", input_size=SIZE)),
                       "mobilenetv3_large_100", good)
