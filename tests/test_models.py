"""DenseViT, ProjectionHead, EMATeacher."""

import pytest
import torch

from neco_loss.models import DenseViT, EMATeacher, ProjectionHead, momentum_at
from neco_loss.weights import load_state_dict

SMALL = {"embed_dim": 48, "depth": 1, "num_heads": 2}


class TestDenseViT:
    @pytest.mark.parametrize(
        "name, prefix, patch",
        [
            ("vit_small_patch14_reg4_dinov2", 5, 14),  # CLS + 4 registers
            ("vit_small_patch14_dinov2", 1, 14),
            ("vit_tiny_patch16_224", 1, 16),
        ],
    )
    def test_patch_maps_without_prefix_tokens(self, name, prefix, patch):
        vit = DenseViT(name, **SMALL).eval()
        assert vit.num_prefix_tokens == prefix and vit.patch_size == patch
        for size in (224, 98) if patch == 14 else (224, 96):
            images = torch.randn(2, 3, size, size)
            maps = vit(images)
            grid = size // patch
            assert maps.shape == (2, 48, grid, grid)
            tokens = vit.vit.forward_features(images)
            assert tokens.shape[1] == prefix + grid * grid
            torch.testing.assert_close(maps.flatten(2).transpose(1, 2), tokens[:, prefix:])

    def test_non_square_input(self):
        vit = DenseViT("vit_small_patch14_reg4_dinov2", **SMALL)
        assert vit(torch.randn(1, 3, 98, 224)).shape == (1, 48, 7, 16)

    def test_sizes_not_divisible_by_the_patch_drop_the_last_pixels(self):
        """As a strided patch embedding: 100 px at patch 14 gives 7 tokens over 98 px."""
        vit = DenseViT("vit_small_patch14_reg4_dinov2", **SMALL).eval()
        images = torch.randn(1, 3, 100, 110)
        torch.testing.assert_close(vit(images), vit(images[..., :98, :98]))
        assert vit(images).shape[2:] == (7, 7)
        with pytest.raises(ValueError, match="image size 13x98 is smaller than one patch"):
            vit(torch.randn(1, 3, 13, 98))
        with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
            vit(torch.randn(3, 98, 98))

    @pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
    def test_local_checkpoint(self, tmp_path, wrap):
        torch.manual_seed(0)
        source = DenseViT("vit_small_patch14_reg4_dinov2", **SMALL).eval()
        state = source.vit.state_dict()
        torch.save(state if wrap is None else {wrap: state}, tmp_path / "weights.pt")
        torch.manual_seed(1)
        loaded = DenseViT(
            "vit_small_patch14_reg4_dinov2", checkpoint=tmp_path / "weights.pt", **SMALL
        ).eval()
        images = torch.randn(1, 3, 98, 98)
        torch.testing.assert_close(loaded(images), source(images))

    def test_checkpoint_of_another_model(self, tmp_path):
        torch.save({"other.weight": torch.zeros(2)}, tmp_path / "weights.pt")
        with pytest.raises(ValueError, match="weights of another kind of model"):
            DenseViT("vit_small_patch14_reg4_dinov2", checkpoint=tmp_path / "weights.pt", **SMALL)

    def test_checkpoint_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_state_dict(tmp_path / "missing.pt")
        torch.save([1, 2], tmp_path / "list.pt")
        with pytest.raises(ValueError, match="holds no state dict of tensors"):
            load_state_dict(tmp_path / "list.pt")

    def test_not_a_vit(self):
        with pytest.raises(
            TypeError,
            match="model must be a ViT of a supported family but is Linear. Supported: ",
        ):
            DenseViT(torch.nn.Linear(2, 2))


class TestProjectionHead:
    def test_shapes_norm_and_init(self):
        head = ProjectionHead(48, hidden_dim=64, out_dim=16)
        out = head(torch.randn(2, 48, 7, 5))
        assert out.shape == (2, 16, 7, 5)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 7, 5))
        widths = [(m.in_features, m.out_features) for m in head.mlp if hasattr(m, "in_features")]
        assert widths == [(48, 64), (64, 64), (64, 16)]
        assert abs(head.mlp[2].weight.std().item() - 0.02) < 0.003

    def test_reference_sizes(self):
        head = ProjectionHead(384)
        assert head.mlp[0].out_features == 2048 and head.mlp[4].out_features == 256


class TestEMATeacher:
    def test_frozen_eval_and_no_graph(self):
        student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
        teacher = EMATeacher(student)
        teacher.train()
        assert not teacher.module.training
        assert all(not p.requires_grad for p in teacher.parameters())
        out = teacher(torch.randn(4, 3, requires_grad=True))
        assert not out.requires_grad
        torch.testing.assert_close(teacher(torch.ones(1, 3)), teacher(torch.ones(1, 3)))

    def test_update_math_and_buffers(self):
        student = torch.nn.BatchNorm1d(3).double()
        teacher = EMATeacher(student)
        before = teacher.module.weight.clone()
        with torch.no_grad():
            student.weight.add_(1.0)
            student.running_mean.fill_(0.7)
        teacher.update(student, momentum=0.9)
        torch.testing.assert_close(teacher.module.weight, 0.9 * before + 0.1 * student.weight)
        torch.testing.assert_close(teacher.module.running_mean, student.running_mean)
        teacher.update(student, momentum=1.0)
        torch.testing.assert_close(teacher.module.weight, 0.9 * before + 0.1 * student.weight)
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            teacher.update(student, momentum=1.5)

    def test_momentum_schedule(self):
        assert momentum_at(0, 100) == pytest.approx(0.9995)
        assert momentum_at(100, 100) == pytest.approx(1.0)
        assert momentum_at(50, 100) == pytest.approx((0.9995 + 1.0) / 2)
        assert momentum_at(200, 100) == pytest.approx(1.0)
