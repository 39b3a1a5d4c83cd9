"""Linear segmentation on frozen patch features (the paper's appendix protocol, standardised).

A 1x1 convolution maps the frozen patch features to class logits, which are upsampled
bilinearly to the masks (training masks downsampled to 100 x 100 with nearest neighbours) and
trained with cross-entropy by SGD (momentum 0.9, weight decay 1e-4) with a step schedule
(x 0.1 after two thirds of the epochs). Validation logits are upsampled to the full masks and
scored by mIoU.

Unlike the paper's lr 0.01 on raw features, every feature channel is standardised with the
training images' mean and standard deviation and the lr is 0.1, so that the probe converges
in a few epochs and a score measures the features rather than how fast a probe converges on
them. Measured on the shipped testbed backbone (200 training, 64 val images, seed 0):
raw features at lr 0.01 gave 0.4417 / 0.5062 / 0.5268 / 0.5384 mIoU after 10 / 20 / 40 / 80
epochs; standardised at lr 0.1, 0.5484 / 0.5499 / 0.5524 after 10 / 20 / 40 (``EPOCHS`` = 20).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from neco_loss.evaluation.in_context import (
    SegmentationDataset,
    score_segmentation,
    segmentation_batches,
)
from neco_loss.progress import progress_bar

TRAIN_MASK_SIZE = 100  # paper appendix: masks at 100 x 100 for training
LEARNING_RATE = 0.1  # on standardised features (the paper: 0.01 on raw ones)
EPOCHS = 20  # converged on standardised features (module docstring)
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


@dataclass
class LinearResult:
    """mIoU and per-class IoU on the validation set, and the trained head."""

    miou: float
    iou: Tensor
    head: nn.Conv2d
    predictions: Tensor  # (n, H, W) of the first ``keep_predictions`` validation images
    per_image: Tensor  # (N, 3, C) every scored image's pixel counts (miou.image_counts)


@torch.no_grad()
def _extract(
    features: Callable[[Tensor], Tensor],
    dataset: SegmentationDataset,
    batch_size: int,
    mask_size: int | None,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    maps, masks = [], []
    for images, batch_masks in segmentation_batches(
        dataset, batch_size, "linear: features", progress
    ):
        maps.append(features(images).float().cpu())
        if mask_size is not None:
            batch_masks = F.interpolate(
                batch_masks[:, None].float(), size=(mask_size, mask_size), mode="nearest"
            )[:, 0].long()
        masks.append(batch_masks)
    return torch.cat(maps), torch.cat(masks)


def linear_segmentation_miou(
    features: Callable[[Tensor], Tensor],
    train_set: SegmentationDataset,
    val_set: SegmentationDataset,
    num_classes: int,
    *,
    epochs: int = EPOCHS,
    batch_size: int = 16,
    ignore_index: int | None = None,
    seed: int = 0,
    keep_predictions: int = 0,
    progress: bool = False,
) -> LinearResult:
    """Train a linear head on frozen, standardised features; score it on the validation set.

    The channels are standardised with the training features' mean and standard deviation
    (the same transform for the validation features).

    Args:
        features: Images ``(B, 3, H, W)`` -> patch maps ``(B, D, h, w)`` (frozen).
        train_set: ``(image, mask)`` pairs to train the head on.
        val_set: ``(image, mask)`` pairs to score.
        num_classes: Number of classes ``C``.
        epochs: Passes over the training features.
        batch_size: Images per step.
        ignore_index: Label left out of the loss and the scores.
        seed: Seeds the head's initialisation and the batch order.
        keep_predictions: Return the predicted masks of this many validation images.
        progress: Show progress bars.

    Returns:
        ``LinearResult``.

    """
    train_maps, train_masks = _extract(features, train_set, batch_size, TRAIN_MASK_SIZE, progress)
    mean = train_maps.mean(dim=(0, 2, 3), keepdim=True)
    scale = train_maps.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)  # a constant channel
    head = _train_head(
        (train_maps - mean) / scale,
        train_masks,
        num_classes,
        epochs,
        batch_size,
        ignore_index,
        seed,
        progress,
    )
    with torch.no_grad():
        confusion, predictions, per_image = score_segmentation(
            lambda images: head((features(images).float().cpu() - mean) / scale),
            val_set,
            num_classes,
            ignore_index=ignore_index,
            batch_size=batch_size,
            keep_predictions=keep_predictions,
            description="linear: validation",
            progress=progress,
        )
    return LinearResult(confusion.miou(), confusion.iou(), head, predictions, per_image)


def _train_head(
    train_maps: Tensor,
    train_masks: Tensor,
    num_classes: int,
    epochs: int,
    batch_size: int,
    ignore_index: int | None,
    seed: int,
    progress: bool,
) -> nn.Conv2d:
    """A 1x1 convolution trained with SGD (step decay at 2/3 of the epochs) on frozen maps."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Conv2d(train_maps.shape[1], num_classes, kernel_size=1)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    schedule = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, 2 * epochs // 3), gamma=0.1
    )
    ignore = -100 if ignore_index is None else ignore_index
    for _ in progress_bar(range(epochs), desc="linear: training", enabled=progress):
        order = torch.randperm(len(train_maps), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            logits = F.interpolate(
                head(train_maps[index]),
                size=train_masks.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
            loss = F.cross_entropy(logits, train_masks[index], ignore_index=ignore)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return head
