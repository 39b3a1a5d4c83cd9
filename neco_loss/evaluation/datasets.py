"""Segmentation datasets as the evaluation protocols consume them."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.transforms import v2

from neco_loss.data.multicrop import IMAGENET_MEAN, IMAGENET_STD


class Normalized:
    """``(image, mask)`` pairs of ``dataset`` with ImageNet-normalised images.

    Args:
        dataset: Returns ``(image (3, H, W) in [0, 1], mask (H, W))``.

    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.dataset[index]
        return self.normalize(image), mask
