"""Overclustering: k-means on all patch tokens, clusters matched to classes, mIoU.

The unsupervised protocol of Leopart / NeCo: every validation image's patch tokens are pooled,
clustered with k-means (faiss) into K clusters, the cluster maps are upsampled to the masks, and
clusters are matched to ground-truth classes: one-to-one by the Hungarian algorithm when K is the
number of classes, many-to-one (each cluster to its majority class) when K is larger. The mIoU is
averaged over k-means seeds. Needs ``faiss-cpu`` and ``scipy`` (``pip install
'neco-loss[eval]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from neco_loss.evaluation.in_context import SegmentationDataset, segmentation_batches, unit_tokens
from neco_loss.evaluation.miou import ConfusionMatrix

KMEANS_ITERATIONS = 20
KMEANS_RESTARTS = 3  # best of 3 initialisations by k-means objective: fewer poor local minima


@dataclass
class OverclusteringResult:
    """mIoU per number of clusters (mean over seeds), and the cluster maps of the last seed."""

    miou: dict[int, float]
    cluster_maps: dict[int, Tensor]  # K -> (n_images, h, w) cluster ids
    matched_maps: dict[int, Tensor]  # K -> (n_images, h, w) the clusters' matched classes


@torch.no_grad()
def overclustering_miou(
    features: Callable[[Tensor], Tensor],
    dataset: SegmentationDataset,
    num_classes: int,
    clusters: tuple[int, ...] = (100, 300, 500),
    *,
    seeds: tuple[int, ...] = (0, 1, 2),
    ignore_index: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> OverclusteringResult:
    """Overclustering mIoU of a dense feature extractor.

    Args:
        features: Images ``(B, 3, H, W)`` -> patch maps ``(B, D, h, w)``.
        dataset: ``(image, mask)`` pairs (masks ``(H, W)`` of equal size).
        num_classes: Number of ground-truth classes ``C``.
        clusters: Numbers of clusters ``K``; ``K == C`` uses Hungarian matching, ``K > C``
            many-to-one (paper: K in {C, 100, 300, 500}).
        seeds: k-means seeds to average over.
        ignore_index: Label left out of the scores.
        batch_size: Images per forward pass.
        progress: Show a progress bar over feature extraction.

    Returns:
        ``OverclusteringResult``.

    Raises:
        ValueError: If some ``K`` is smaller than ``C`` or larger than the number of tokens.

    """
    import faiss  # before the feature pass: a missing extra fails at once

    tokens, masks, grid = _tokens_and_masks(features, dataset, batch_size, progress)
    flat = tokens.flatten(0, 1).contiguous().numpy()
    miou: dict[int, float] = {}
    maps: dict[int, Tensor] = {}
    matched: dict[int, Tensor] = {}
    for k in clusters:
        if not num_classes <= k <= len(flat):
            raise ValueError(
                f"clusters must be between num_classes {num_classes} and the {len(flat)} tokens "
                f"but include {k}."
            )
        scores = []
        for seed in seeds:
            cluster_map = _kmeans_clusters(faiss, flat, k, seed).view(len(masks), *grid)
            upsampled = F.interpolate(
                cluster_map[:, None].float(), size=masks.shape[-2:], mode="nearest"
            )[:, 0].long()
            confusion = ConfusionMatrix(num_classes, ignore_index, num_predictions=k)
            confusion.update(upsampled, masks)
            matching = "hungarian" if k == num_classes else "many_to_one"
            scores.append(confusion.matched(matching).miou())
            maps[k] = cluster_map
            matched[k] = confusion.assignment(matching)[cluster_map].clamp(min=0)
        miou[k] = sum(scores) / len(scores)
    return OverclusteringResult(miou, maps, matched)


def _tokens_and_masks(
    features: Callable[[Tensor], Tensor],
    dataset: SegmentationDataset,
    batch_size: int,
    progress: bool,
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Unit patch tokens ``(n, h * w, D)``, masks ``(n, H, W)`` and the grid ``(h, w)``."""
    tokens, masks = [], []
    grid: tuple[int, ...] = ()
    for images, batch_masks in segmentation_batches(
        dataset, batch_size, "overclustering features", progress
    ):
        feature_map = features(images)
        grid = tuple(feature_map.shape[2:])
        tokens.append(unit_tokens(feature_map))
        masks.append(batch_masks)
    return torch.cat(tokens), torch.cat(masks), grid


def _kmeans_clusters(faiss: Any, flat: Any, k: int, seed: int) -> Tensor:
    """Spherical k-means (``faiss``) of ``flat`` ``(n, D)`` tokens: their clusters ``(n,)``."""
    kmeans = faiss.Kmeans(
        flat.shape[1],
        k,
        niter=KMEANS_ITERATIONS,
        nredo=KMEANS_RESTARTS,
        seed=seed,
        spherical=True,
        verbose=False,
    )
    kmeans.train(flat)
    _, assignment = kmeans.index.search(flat, 1)
    return torch.as_tensor(assignment[:, 0])
