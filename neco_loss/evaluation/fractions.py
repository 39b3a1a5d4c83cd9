"""In-context evaluation with a fraction of the training images.

Hummingbird's data-efficiency protocol: memory banks from class-balanced subsets of the
training images, averaged over seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from neco_loss.evaluation.in_context import SegmentationDataset, in_context_miou

FRACTIONS = (1 / 128, 1 / 64, 1 / 8, 1.0)  # paper: 1/128, 1/64, 1/8 and all of the data


class Subset:
    """The images ``indices`` of ``dataset``."""

    def __init__(self, dataset: SegmentationDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        item: tuple[Tensor, Tensor] = self.dataset[self.indices[index]]
        return item


def class_presence(dataset: SegmentationDataset, num_classes: int) -> Tensor:
    """``(n, C)`` bool: which classes each image's mask contains (ignored labels left out)."""
    presence = torch.zeros(len(dataset), num_classes, dtype=torch.bool)
    for index in range(len(dataset)):
        labels = dataset[index][1].unique()
        presence[index, labels[labels < num_classes]] = True
    return presence


def balanced_subset(presence: Tensor, count: int, seed: int) -> list[int]:
    """``count`` image indices covering the classes as evenly as possible.

    Classes are visited from the rarest on, round after round; each visit adds a random not yet
    chosen image that contains the class, so rare classes are represented even in tiny subsets.
    """
    generator = torch.Generator().manual_seed(seed)
    count = max(1, min(count, len(presence)))
    order = torch.randperm(len(presence), generator=generator)
    rarest_first = presence.sum(dim=0).argsort().tolist()
    chosen: list[int] = []
    taken = torch.zeros(len(presence), dtype=torch.bool)
    while len(chosen) < count:
        added = False
        for label in rarest_first:
            candidates = order[presence[order, label] & ~taken[order]]
            if len(candidates) and len(chosen) < count:
                chosen.append(int(candidates[0]))
                taken[candidates[0]] = True
                added = True
        if not added:  # the remaining images contain no class: add them in random order
            rest = order[~taken[order]]
            chosen.extend(int(i) for i in rest[: count - len(chosen)])
    return chosen


def in_context_fractions(
    features: Callable[[Tensor], Tensor],
    train_set: SegmentationDataset,
    val_set: SegmentationDataset,
    num_classes: int,
    *,
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    ignore_index: int | None = None,
    progress: bool = False,
) -> dict[float, float]:
    """In-context mIoU with memory banks from class-balanced fractions of ``train_set``.

    Returns:
        ``{fraction: mIoU averaged over seeds}`` (one seed for the full set).

    Raises:
        ValueError: If a fraction is not in (0, 1].

    """
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"fractions must be in (0, 1] but include {fraction!r}.")
    presence = class_presence(train_set, num_classes)
    results: dict[float, float] = {}
    for fraction in fractions:
        scores = []
        for seed in seeds if fraction < 1 else seeds[:1]:
            indices = balanced_subset(presence, round(fraction * len(train_set)), seed)
            scores.append(
                in_context_miou(
                    features,
                    Subset(train_set, indices),
                    val_set,
                    num_classes,
                    ignore_index=ignore_index,
                    progress=progress,
                ).miou
            )
        results[fraction] = sum(scores) / len(scores)
    return results
