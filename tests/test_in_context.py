"""mIoU and the in-context (Hummingbird) evaluation."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from neco_loss.evaluation import ConfusionMatrix, in_context_miou
from neco_loss.evaluation.in_context import patch_label_histograms


class TestConfusionMatrix:
    def test_hand_computed(self):
        matrix = ConfusionMatrix(3)
        target = torch.tensor([0, 0, 1, 1, 2, 2])
        prediction = torch.tensor([0, 1, 1, 1, 2, 0])
        matrix.update(prediction, target)
        # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
        torch.testing.assert_close(
            matrix.iou(), torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64)
        )
        assert matrix.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)

    def test_ignore_index_and_absent_classes(self):
        matrix = ConfusionMatrix(4, ignore_index=255)
        matrix.update(torch.tensor([[0, 1], [3, 3]]), torch.tensor([[0, 1], [255, 255]]))
        assert matrix.matrix.sum() == 2
        assert torch.isnan(matrix.iou()[2:]).all() and matrix.miou() == 1.0

    def test_errors(self):
        matrix = ConfusionMatrix(2)
        with pytest.raises(ValueError, match="differ"):
            matrix.update(torch.zeros(3), torch.zeros(4))
        with pytest.raises(ValueError, match=r"target values must be in \[0, 2\)"):
            matrix.update(torch.zeros(2), torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            ConfusionMatrix(0)


def test_patch_label_histograms():
    mask = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1]])[None]  # (1, 2, 4): two 2x2 patches
    histograms = patch_label_histograms(mask, (1, 2), num_classes=3)
    torch.testing.assert_close(histograms[0], torch.tensor([[0.75, 0.0, 0.25], [0.0, 1.0, 0.0]]))
    ignored = patch_label_histograms(torch.tensor([[[0, 255], [255, 255]]]), (1, 1), 3, 255)
    torch.testing.assert_close(ignored[0], torch.tensor([[1.0, 0.0, 0.0]]))


class BlockScenes:
    """Images of 8 px wide vertical stripes of 3 classes; colour channel ``c`` is on for class c.

    Stripes, because bilinear upsampling of patch scores (the protocol) is then exact: scores of
    neighbouring patches cross on the class boundary. At corners of 2D blocks it is not.
    """

    def __init__(self, length: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.masks = torch.randint(0, 3, (length, 1, 4), generator=generator).expand(-1, 4, -1)
        self.masks = self.masks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (n, 32, 32)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int):
        mask = self.masks[index]
        return F.one_hot(mask, 3).permute(2, 0, 1).float(), mask


def colour_features(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 8)  # (B, 3, 4, 4): the class one-hot of each patch


class TestInContext:
    def test_features_that_encode_the_labels_score_one(self):
        result = in_context_miou(
            colour_features,
            BlockScenes(6, 0),
            BlockScenes(4, 1),
            3,
            batch_size=3,
            keep_predictions=2,
        )
        assert result.miou == pytest.approx(1.0)
        assert result.predictions.shape == (2, 32, 32)
        assert torch.equal(result.predictions[0], BlockScenes(4, 1)[0][1])

    def test_constant_features_score_near_chance(self):
        def constant(images):
            return torch.ones(images.shape[0], 5, 4, 4)

        result = in_context_miou(constant, BlockScenes(6, 0), BlockScenes(4, 1), 3, k=5)
        assert result.miou < 0.25  # one class everywhere: IoU = its share, others 0

    def test_memory_size_caps_the_bank(self):
        from neco_loss.evaluation.in_context import build_memory

        keys, labels = build_memory(colour_features, BlockScenes(6, 0), 3, memory_size=30)
        assert keys.shape == (30, 3) and labels.shape == (30, 3)
        keys, _ = build_memory(colour_features, BlockScenes(6, 0), 3)
        assert keys.shape == (96, 3)


def test_scann_search_matches_exact_search():
    pytest.importorskip("scann")
    from neco_loss.evaluation.in_context import predict_patches

    generator = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(500, 16, generator=generator), dim=1)
    queries = F.normalize(torch.randn(40, 16, generator=generator), dim=1)
    labels = torch.softmax(torch.randn(500, 4, generator=generator), dim=1)
    exact = predict_patches(queries, keys, labels, k=10)
    approximate = predict_patches(queries, keys, labels, k=10, search="scann")
    torch.testing.assert_close(approximate, exact, rtol=1e-4, atol=1e-5)
    result = in_context_miou(
        colour_features, BlockScenes(6, 0), BlockScenes(4, 1), 3, search="scann"
    )
    assert result.miou == pytest.approx(1.0)
    with pytest.raises(ValueError, match="search must be one of"):
        predict_patches(queries, keys, labels, search="faiss")
