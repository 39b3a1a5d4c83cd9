"""In-context (dense nearest-neighbour) segmentation, the Hummingbird protocol.

Balazevic et al., "Towards in-context scene understanding", NeurIPS 2023, as implemented in
open-hummingbird-eval.

A memory bank holds L2-normalised patch features of training images with each patch's soft
label histogram (the fraction of its pixels of each class). Every validation patch takes its
``k = 30`` nearest memory entries by cosine similarity, mixes their histograms with weights
``softmax(similarity / 0.02)``, the patch predictions are upsampled bilinearly to the image and
the argmax is scored by mIoU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.utils.data import DataLoader

from neco_loss.evaluation.miou import ConfusionMatrix, image_counts
from neco_loss.progress import progress_bar

NEIGHBOURS = 30  # hummingbird: num_neighbour 30
TEMPERATURE = 0.02  # hummingbird: nn_params temperature 0.02
QUERY_CHUNK = 4096  # query patches per similarity block

FeatureFn = Callable[[Tensor], Tensor]  # images (B, 3, H, W) -> patch maps (B, D, h, w)


class SegmentationDataset(Protocol):
    """Indexable ``(image (3, H, W), mask (H, W))`` pairs with a length."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclass
class InContextResult:
    """Outcome of ``in_context_miou``.

    Attributes:
        miou: Mean IoU over the validation set.
        iou: ``(C,)`` IoU per class.
        predictions: ``(n, H, W)`` predicted masks of the first ``keep_predictions`` images.
        per_image: ``(N, 3, C)`` every scored image's pixel counts (``miou.image_counts``).

    """

    miou: float
    iou: Tensor
    predictions: Tensor
    per_image: Tensor


def patch_label_histograms(
    masks: Tensor, grid: tuple[int, int], num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """``(B, h * w, C)`` fraction of each patch's pixels per class (ignored pixels left out).

    Args:
        masks: ``(B, H, W)`` class indices; ``H, W`` multiples of the grid.
        grid: ``(h, w)`` patch grid.
        num_classes: ``C``.
        ignore_index: Label left out of the histograms.

    """
    valid = torch.ones_like(masks, dtype=torch.bool)
    if ignore_index is not None:
        valid = masks != ignore_index
    one_hot = F.one_hot(masks.clamp(0, num_classes - 1) * valid, num_classes)
    one_hot = (one_hot * valid[..., None]).permute(0, 3, 1, 2).float()  # (B, C, H, W)
    pooled = F.adaptive_avg_pool2d(one_hot, grid)  # (B, C, h, w)
    total = pooled.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return (pooled / total).flatten(2).transpose(1, 2)


def segmentation_batches(
    dataset: SegmentationDataset, batch_size: int, desc: str, progress: bool
) -> Iterable[tuple[Tensor, Tensor]]:
    """``(images, masks)`` batches in order, with a progress bar when asked."""
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=batch_size)  # type: ignore[arg-type]
    yield from progress_bar(loader, desc=desc, enabled=progress, total=len(loader))


def unit_tokens(feature_map: Tensor) -> Tensor:
    """``(B, h * w, D)`` L2-normalised float32 tokens on the CPU of ``(B, D, h, w)`` maps."""
    return F.normalize(feature_map.flatten(2).transpose(1, 2).float(), dim=-1).cpu()


@torch.no_grad()
def build_memory(
    features: FeatureFn,
    dataset: SegmentationDataset,
    num_classes: int,
    *,
    batch_size: int = 16,
    memory_size: int | None = None,
    ignore_index: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Memory bank of normalised patch features ``(M, D)`` and label histograms ``(M, C)``.

    ``memory_size`` caps ``M``: each image contributes ``memory_size // len(dataset)`` random
    patches (hummingbird's per-image sampling); ``None`` keeps every patch.
    """
    generator = torch.Generator().manual_seed(seed)
    per_image = None if memory_size is None else max(1, memory_size // len(dataset))
    keys, labels = [], []
    for images, masks in segmentation_batches(dataset, batch_size, "memory bank", progress):
        feature_map = features(images)
        grid = (feature_map.shape[2], feature_map.shape[3])
        tokens = unit_tokens(feature_map)
        histograms = patch_label_histograms(masks, grid, num_classes, ignore_index)
        if per_image is not None and per_image < tokens.shape[1]:
            chosen = torch.rand(tokens.shape[:2], generator=generator).argsort(1)[:, :per_image]
            tokens = tokens.gather(1, chosen[..., None].expand(-1, -1, tokens.shape[2]))
            histograms = histograms.gather(1, chosen[..., None].expand(-1, -1, num_classes))
        keys.append(tokens.flatten(0, 1))
        labels.append(histograms.flatten(0, 1))
    return torch.cat(keys), torch.cat(labels)


SEARCHES = ("torch", "scann")
SCANN_TREE_MIN = 100_000  # smaller banks are searched exactly (brute force) by ScaNN too


def _scann_neighbours(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(similarity, index)`` of the ``k`` nearest keys by ScaNN (``pip install scann``).

    Large memory banks use a tree + asymmetric-hashing index (512 leaves, 256 searched, 1800
    re-ordered), small ones brute force (exact).
    """
    import scann

    builder = scann.scann_ops_pybind.builder(keys.numpy(), k, "dot_product")
    if len(keys) >= SCANN_TREE_MIN:
        builder = builder.tree(
            num_leaves=512, num_leaves_to_search=256, training_sample_size=min(len(keys), 250_000)
        )
        builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(1800)
    else:
        builder = builder.score_brute_force()
    index, similarity = builder.build().search_batched(queries.numpy(), final_num_neighbors=k)
    return torch.as_tensor(similarity), torch.as_tensor(index.astype("int64"))


def predict_patches(
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    k: int = NEIGHBOURS,
    temperature: float = TEMPERATURE,
    search: str = "torch",
) -> Tensor:
    """``(Q, C)`` class distributions of normalised query patches from the memory bank.

    ``search="torch"`` is exact; ``"scann"`` uses ScaNN when installed.
    """
    k = min(k, len(keys))
    if search == "scann":
        top, index = _scann_neighbours(queries, keys, k)
        weights = torch.softmax(top / temperature, dim=1)
        return (weights[..., None] * labels[index]).sum(dim=1)
    if search != "torch":
        raise ValueError(f"search must be one of {list(SEARCHES)} but is {search!r}.")
    out = []
    for start in range(0, len(queries), QUERY_CHUNK):
        similarity = queries[start : start + QUERY_CHUNK] @ keys.T  # (q, M)
        top, index = similarity.topk(k, dim=1)
        weights = torch.softmax(top / temperature, dim=1)  # (q, k)
        out.append((weights[..., None] * labels[index]).sum(dim=1))
    return torch.cat(out)


@torch.no_grad()
def in_context_miou(
    features: FeatureFn,
    train_set: SegmentationDataset,
    val_set: SegmentationDataset,
    num_classes: int,
    *,
    k: int = NEIGHBOURS,
    temperature: float = TEMPERATURE,
    batch_size: int = 16,
    memory_size: int | None = None,
    ignore_index: int | None = None,
    keep_predictions: int = 0,
    search: str = "torch",
    progress: bool = False,
) -> InContextResult:
    """In-context segmentation mIoU of a dense feature extractor.

    Args:
        features: Images ``(B, 3, H, W)`` (as the datasets return them) -> patch maps
            ``(B, D, h, w)``.
        train_set: ``(image, mask)`` pairs for the memory bank.
        val_set: ``(image, mask)`` pairs to segment.
        num_classes: Number of classes.
        k: Neighbours per query patch (hummingbird: 30).
        temperature: Softmax temperature of the neighbour weights (hummingbird: 0.02).
        batch_size: Images per forward pass.
        memory_size: Cap of the memory bank (``None``: every training patch).
        ignore_index: Label left out of histograms and scores.
        keep_predictions: Return the predicted masks of this many validation images.
        search: Nearest-neighbour search: ``"torch"`` (exact) or ``"scann"`` (when installed).
        progress: Show progress bars.

    Returns:
        ``InContextResult``.

    """
    keys, labels = build_memory(
        features,
        train_set,
        num_classes,
        batch_size=batch_size,
        memory_size=memory_size,
        ignore_index=ignore_index,
        progress=progress,
    )

    confusion, predictions, per_image = score_segmentation(
        partial(_retrieved_scores, features, keys, labels, (k, temperature, search)),
        val_set,
        num_classes,
        ignore_index=ignore_index,
        batch_size=batch_size,
        keep_predictions=keep_predictions,
        description="in-context eval",
        progress=progress,
    )
    return InContextResult(confusion.miou(), confusion.iou(), predictions, per_image)


def _retrieved_scores(
    features: FeatureFn,
    keys: Tensor,
    labels: Tensor,
    search: tuple[int, float, str],
    images: Tensor,
) -> Tensor:
    """Class scores ``(B, C, h, w)`` of every patch from its neighbours in the memory bank.

    ``search`` is ``(k, temperature, search backend)`` of ``predict_patches``.
    """
    feature_map = features(images)
    batch, _, height, width = feature_map.shape
    queries = unit_tokens(feature_map)
    scores = predict_patches(queries.flatten(0, 1), keys, labels, *search)
    return scores.view(batch, height, width, labels.shape[-1]).permute(0, 3, 1, 2)


def score_segmentation(
    class_scores: Callable[[Tensor], Tensor],
    val_set: SegmentationDataset,
    num_classes: int,
    *,
    ignore_index: int | None,
    batch_size: int,
    keep_predictions: int,
    description: str,
    progress: bool,
) -> tuple[ConfusionMatrix, Tensor, Tensor]:
    """Segment every scored image by the argmax of its upsampled class scores.

    Args:
        class_scores: Images ``(B, 3, H, W)`` -> class scores ``(B, C, h, w)``.
        val_set: ``(image, mask)`` pairs to score.
        num_classes: ``C``.
        ignore_index: Label left out of the scores.
        batch_size: Images per call.
        keep_predictions: How many predicted masks to return.
        description: Progress bar label.
        progress: Show a progress bar.

    Returns:
        The confusion matrix, the first ``keep_predictions`` predictions ``(n, H, W)`` and
        every image's pixel counts ``(N, 3, C)`` (``miou.image_counts``).

    """
    confusion = ConfusionMatrix(num_classes, ignore_index)
    kept: list[Tensor] = []
    counts: list[Tensor] = []
    for images, masks in segmentation_batches(val_set, batch_size, description, progress):
        upsampled = F.interpolate(
            class_scores(images), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        prediction = upsampled.argmax(dim=1)
        confusion.update(prediction, masks)
        counts.append(image_counts(prediction, masks, num_classes, ignore_index))
        kept.extend(prediction[: max(0, keep_predictions - len(kept))])
    predictions = torch.stack(kept) if kept else torch.empty(0, dtype=torch.long)
    return confusion, predictions, torch.cat(counts)
