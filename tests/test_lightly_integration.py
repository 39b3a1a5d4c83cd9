"""The lightly integration with the real lightly: transform, LightningModule, examples."""

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightly.data import LightlyDataset, MultiViewCollate
from neco_loss.integrations.lightly import NeCo, NeCoTransform, split_views_and_boxes
from torch.utils.data import DataLoader

from neco_loss.models import DenseViT

from .crops import assert_view_shows_box, ramp_image

ROOT = Path(__file__).parents[1]
TINY_EXAMPLE_VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def plain_transform(**changes) -> NeCoTransform:
    options = {
        "global_crop_size": 32,
        "local_crop_size": 16,
        "cj_prob": 0.0,
        "random_gray_scale": 0.0,
        "gaussian_blur_prob": 0.0,
        "normalize": None,
    }
    return NeCoTransform(**{**options, **changes})


def image_folder(tmp_path: Path, count: int = 4) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(count):
        ramp_image().save(folder / f"{index}.png")
    return folder


class TestNeCoTransform:
    @pytest.mark.parametrize("hf_prob", [0.0, 1.0])
    def test_boxes_through_lightly_dataset_and_collate(self, tmp_path, hf_prob):
        torch.manual_seed(0)
        data = LightlyDataset(
            str(image_folder(tmp_path)), transform=plain_transform(hf_prob=hf_prob)
        )
        batch = next(iter(DataLoader(data, batch_size=4, collate_fn=MultiViewCollate())))
        views, boxes = split_views_and_boxes(batch[0])
        assert len(views) == 6 and boxes.shape == (4, 6, 5)
        assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4
        assert (boxes[..., 4] == hf_prob).all()
        for view, view_boxes in zip(views, boxes.unbind(1), strict=True):
            for image, box in zip(view, view_boxes.tolist(), strict=True):
                assert_view_shows_box(image, box, 120, 160, border=1, pixels=0.75)

    def test_overlap_and_plain_torchvision_dataset(self):
        from torchvision.datasets import FakeData

        torch.manual_seed(1)
        data = FakeData(size=8, image_size=(3, 60, 80), transform=plain_transform(min_overlap=0.1))
        views_and_boxes, _ = next(iter(DataLoader(data, batch_size=8)))  # default collate
        _, boxes = split_views_and_boxes(views_and_boxes)
        area = 60 * 80
        for index in range(1, 6):
            earlier = boxes[:, : min(index, 2), :4]
            top_left = torch.maximum(boxes[:, index, None, :2], earlier[..., :2])
            bottom_right = torch.minimum(boxes[:, index, None, 2:4], earlier[..., 2:])
            overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
            assert (overlap > 0.1 * area * (2 if index < 2 else 1)).all()

    def test_errors(self):
        with pytest.raises(ValueError, match="min_overlap must be in"):
            NeCoTransform(min_overlap=1.5)
        with pytest.raises(ValueError, match="V views followed by V boxes"):
            split_views_and_boxes([torch.zeros(1)] * 3)
        with pytest.raises(ValueError, match="could not sample crop"):
            plain_transform(local_crop_scale=(0.01, 0.02), min_overlap=0.5, max_tries=5)(
                ramp_image()
            )


def test_lightning_fit_updates_student_and_moves_frozen_teacher(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = NeCo(
        DenseViT("vit_small_patch14_reg4_dinov2", **TINY_VIT),
        head_hidden_dim=32,
        head_out_dim=16,
        lr_backbone=1e-3,
        lr_head=1e-3,
        momentum_start=0.9,
        roi_size=2,
    )
    data = LightlyDataset(str(image_folder(tmp_path, 6)), transform=plain_transform())
    loader = DataLoader(data, batch_size=2, collate_fn=MultiViewCollate(), drop_last=True)
    name = "blocks.0.attn.qkv.weight"
    student_before = model.student_backbone.vit.state_dict()[name].clone()
    teacher_before = model.teacher_backbone.vit.state_dict()[name].clone()
    stats_steps = []
    compute_stats = model.criterion._stats
    monkeypatch.setattr(
        model.criterion,
        "_stats",
        lambda *args: stats_steps.append(model.global_step) or compute_stats(*args),
    )
    trainer = pl.Trainer(
        max_steps=3,
        log_every_n_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, loader)
    assert stats_steps == [1]  # diagnostics only on Lightning's logging step (the 2nd)
    student = model.student_backbone.vit.state_dict()[name]
    teacher = model.teacher_backbone.vit.state_dict()[name]
    assert trainer.global_step == 3
    assert not torch.equal(student, student_before)
    assert not torch.equal(teacher, teacher_before) and not torch.equal(teacher, student)
    assert all(not p.requires_grad for p in model.teacher_backbone.parameters())
    assert all(not p.requires_grad for p in model.teacher_head.parameters())
    assert (
        "train_loss" in trainer.logged_metrics and "neco/rank_agreement" in trainer.logged_metrics
    )


class TestTeachersAndLossMask:
    """``teacher`` and ``loss_mask`` in the lightly module, as in ``neco train``."""

    def batch(self, tmp_path):
        torch.manual_seed(0)
        data = LightlyDataset(
            str(image_folder(tmp_path)),
            transform=plain_transform(global_crop_size=48, local_crop_size=20),
        )
        return next(iter(DataLoader(data, batch_size=4, collate_fn=MultiViewCollate())))

    def model(self, teacher, **loss):
        vit = DenseViT(
            "vit_small_patch14_reg4_dinov2", **{**TINY_VIT, "depth": 2}, drop_path_rate=0.5
        )
        return NeCo(
            vit, head_hidden_dim=32, head_out_dim=16, teacher=teacher, roi_size=2, **loss
        ).train()

    @pytest.mark.parametrize("teacher", ["ema", "student", "student_detached"])
    def test_teacher_maps_and_foreground(self, tmp_path, teacher):
        model = self.model(teacher, loss_mask="foreground")
        views, boxes = split_views_and_boxes(self.batch(tmp_path)[0])
        torch.manual_seed(1)
        student_maps, teacher_maps, foreground = model.encode(views)
        assert [tuple(m.shape) for m in foreground] == [(4, 6, 6)] * 2
        assert all(m.any() and not m.all() for m in foreground)
        assert all(m.requires_grad for m in teacher_maps) == (teacher == "student")
        if teacher == "student_detached":
            torch.testing.assert_close(teacher_maps[0], student_maps[0].detach())
        else:  # another forward: the EMA teacher (eval, no drop-path) or fresh drop-path
            assert not torch.equal(teacher_maps[0], student_maps[0].detach())
        loss = model.criterion(
            student_maps, teacher_maps, boxes, crop_sizes=[48] * 2 + [20] * 4, foreground=foreground
        )
        loss.backward()
        assert torch.isfinite(loss) and float(loss.detach()) > 0

    def test_unknown_teacher(self):
        with pytest.raises(ValueError, match="teacher must be one of"):
            self.model("none")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["neco.py", "neco_lightning.py"])
def test_examples_run(script, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "lightly" / script),
            *["--max-steps", "3", "--batch-size", "4", "--output", str(tmp_path)],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = tmp_path / "backbone.pt"
    assert f"student backbone weights saved to {saved}" in result.stdout
    backbone = DenseViT("vit_small_patch14_reg4_dinov2", checkpoint=saved, **TINY_EXAMPLE_VIT)
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 96, 8, 8)
    assert "Warning" not in result.stderr, result.stderr[-2000:]  # quiet: nothing deprecated


@pytest.mark.parametrize("objective", ["paka", "similarity_ce", "continued"])
def test_objectives_as_arms_of_the_lightly_module(tmp_path, objective):
    """``objective=`` picks the loss on the same step; continued has no head, trains expanders."""
    torch.manual_seed(0)
    model = NeCo(
        DenseViT("vit_small_patch14_reg4_dinov2", **TINY_VIT),
        head_hidden_dim=32,
        head_out_dim=16,
        objective=objective,
        roi_size=2,
    )
    data = LightlyDataset(str(image_folder(tmp_path)), transform=plain_transform())
    batch = next(iter(DataLoader(data, batch_size=4, collate_fn=MultiViewCollate())))
    views, boxes = split_views_and_boxes(batch[0])
    maps = model.encode(views)
    loss = model.criterion(maps.student, maps.teacher, boxes, crop_sizes=[32] * 2 + [16] * 4)
    loss.backward()
    gradient = model.student_backbone.vit.blocks[0].attn.qkv.weight.grad
    assert torch.isfinite(loss) and gradient is not None and gradient.abs().sum() > 0
    trained = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    assert all(id(p) in trained for p in model.criterion.parameters())
    assert isinstance(model.student_head, torch.nn.Identity) == (objective == "continued")
