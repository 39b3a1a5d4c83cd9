"""Matching in the confusion matrix, overclustering, linear segmentation."""

import pytest
import torch

from neco_loss.evaluation.fractions import balanced_subset, class_presence, in_context_fractions
from neco_loss.evaluation.linear import linear_segmentation_miou
from neco_loss.evaluation.miou import ConfusionMatrix
from neco_loss.evaluation.overclustering import overclustering_miou
from tests.test_in_context import BlockScenes, colour_features


class TestMatching:
    def test_hungarian_undoes_a_permutation(self):
        target = torch.tensor([0, 0, 1, 1, 2, 2])
        matrix = ConfusionMatrix(3, num_predictions=3)
        matrix.update((target + 1) % 3, target)
        assert matrix.matched("hungarian").miou() == 1.0

    def test_hungarian_with_more_clusters_counts_unmatched_as_wrong(self):
        target = torch.tensor([0, 0, 0, 0, 1, 1])
        prediction = torch.tensor([0, 0, 2, 2, 1, 1])  # cluster 2 is half of class 0
        matched = ConfusionMatrix(2, num_predictions=3)
        matched.update(prediction, target)
        # class 0: 2 of 4 pixels right (IoU 0.5), class 1 exact (IoU 1)
        assert matched.matched("hungarian").miou() == pytest.approx(0.75)
        assert matched.matched("many_to_one").miou() == 1.0

    def test_many_to_one_majority(self):
        target = torch.tensor([0, 0, 0, 1, 1, 1])
        prediction = torch.tensor([0, 0, 1, 1, 2, 2])  # cluster 1 mixed: majority? tie -> class 0
        matrix = ConfusionMatrix(2, num_predictions=3)
        matrix.update(prediction, target)
        iou = matrix.matched("many_to_one").iou()
        # cluster 0 -> 0, cluster 1 (one of each) -> 0 (first max), cluster 2 -> 1
        torch.testing.assert_close(iou, torch.tensor([3 / 4, 2 / 3], dtype=torch.float64))

    def test_errors(self):
        matrix = ConfusionMatrix(2, num_predictions=3)
        with pytest.raises(ValueError, match="matching must be"):
            matrix.matched("greedy")
        with pytest.raises(ValueError, match="call matched"):
            matrix.iou()


def noisy_colour_features(images):
    """Class prototypes plus small noise: many distinct points, clusters still separable."""
    generator = torch.Generator().manual_seed(int(images.sum()) % 1000)
    features = colour_features(images)
    return features + 0.05 * torch.randn(features.shape, generator=generator)


class TestOverclustering:
    def test_recovers_the_ground_truth_from_features_that_encode_it(self):
        result = overclustering_miou(
            noisy_colour_features, BlockScenes(16, 0), 3, clusters=(3, 6), seeds=(0, 1, 2, 3)
        )
        assert result.miou[3] == pytest.approx(1.0)  # Hungarian on K = C
        assert result.miou[6] == pytest.approx(1.0)  # many-to-one on K > C
        assert result.cluster_maps[3].shape == (16, 4, 4)

    def test_random_features_do_not(self):
        def noise(images):
            generator = torch.Generator().manual_seed(int(images.sum()) % 1000)
            return torch.randn(images.shape[0], 8, 4, 4, generator=generator)

        result = overclustering_miou(noise, BlockScenes(8, 0), 3, clusters=(3,), seeds=(0,))
        assert result.miou[3] < 0.6

    def test_bad_cluster_counts(self):
        with pytest.raises(ValueError, match="clusters must be between num_classes 3"):
            overclustering_miou(colour_features, BlockScenes(2, 0), 3, clusters=(2,))


def scaled(images):
    """Separable but not one-hot features: an invertible mix of the class indicators."""
    mix = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -0.7], [-0.4, 0.2, 1.8]])
    return torch.einsum("bchw,dc->bdhw", colour_features(images), mix) * 3


class TestLinear:
    def test_near_perfect_on_separable_features(self):
        result = linear_segmentation_miou(
            scaled, BlockScenes(16, 0), BlockScenes(6, 1), 3, epochs=30, batch_size=4
        )
        assert result.miou > 0.95
        assert result.head.weight.shape == (3, 3, 1, 1)

    def test_ignore_index_is_left_out(self):
        class WithIgnored(BlockScenes):
            def __getitem__(self, index):
                image, mask = super().__getitem__(index)
                mask = mask.clone()
                mask[:8] = 255
                return image, mask

        result = linear_segmentation_miou(
            scaled,
            WithIgnored(16, 0),
            WithIgnored(4, 1),
            3,
            epochs=20,
            batch_size=4,
            ignore_index=255,
        )
        assert result.miou > 0.9

    def test_constant_features_score_low(self):
        def constant(images):
            return torch.ones(images.shape[0], 3, 4, 4)

        result = linear_segmentation_miou(
            constant, BlockScenes(8, 0), BlockScenes(4, 1), 3, epochs=5, batch_size=4
        )
        assert result.miou < 0.4


class TestFractions:
    def test_balanced_subset_covers_rare_classes(self):
        presence = torch.zeros(100, 3, dtype=torch.bool)
        presence[:, 0] = True  # class 0 everywhere
        presence[:50, 1] = True
        presence[97:, 2] = True  # class 2 in only 3 images
        chosen = balanced_subset(presence, 3, seed=0)
        assert len(chosen) == len(set(chosen)) == 3
        assert presence[chosen, 2].any() and presence[chosen, 1].any()
        assert balanced_subset(presence, 3, seed=0) == chosen  # reproducible
        assert len(balanced_subset(presence, 1000, seed=0)) == 100

    def test_images_without_classes_fill_the_rest(self):
        presence = torch.zeros(5, 2, dtype=torch.bool)
        presence[0, 0] = True
        chosen = balanced_subset(presence, 4, seed=0)
        assert chosen[0] == 0 and len(set(chosen)) == 4

    def test_fractions_on_separable_features(self):
        results = in_context_fractions(
            colour_features,
            BlockScenes(16, 0),
            BlockScenes(4, 1),
            3,
            fractions=(1 / 8, 1.0),
            seeds=(0, 1),
        )
        assert set(results) == {1 / 8, 1.0}
        assert results[1.0] == pytest.approx(1.0)
        assert results[1 / 8] > 0.5  # two balanced images already cover the classes
        with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\]"):
            in_context_fractions(
                colour_features, BlockScenes(2, 0), BlockScenes(2, 1), 3, fractions=(0.0,)
            )

    def test_class_presence(self):
        presence = class_presence(BlockScenes(3, 0), 3)
        assert presence.shape == (3, 3) and presence.any(dim=1).all()
