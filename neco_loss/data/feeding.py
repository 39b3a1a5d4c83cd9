"""Seeded feeding of multi-crop views.

The same images, crops and order on every run and resume, and each process of a distributed
run its slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from neco_loss.data.multicrop import NeCoMultiCrop


class MultiCropDataset(Dataset):
    """Applies ``NeCoMultiCrop`` to a dataset's images, seeded per (seed, epoch, index).

    Items of ``base`` may be images or tuples whose first entry is the image (masks are
    dropped). Returns ``(views, boxes)``.
    """

    def __init__(self, base: Any, transform: NeCoMultiCrop, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[list[Tensor], Tensor]:
        item = self.base[index]
        image = item[0] if isinstance(item, tuple) else item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image)


class EpochSampler(Sampler[int]):
    """A permutation per (seed, epoch), cut into global batches of ``batch_size * world``.

    Process ``rank`` takes slice ``rank`` of every global batch, so the processes together see
    exactly what one process with the global batch would see, in the same order. ``start``
    (in global batches) skips what was already trained on.
    """

    def __init__(self, length: int, seed: int, batch_size: int, rank: int = 0, world: int = 1):
        self.length = length
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the last incomplete one is dropped)."""
        return self.length // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        global_batch = self.batch_size * self.world
        for batch in range(self.start, self.batches_per_epoch):
            first = batch * global_batch + self.rank * self.batch_size
            yield from order[first : first + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch_size


def batches_from(
    dataset: MultiCropDataset,
    sampler: EpochSampler,
    step: int,
    batch_size: int,
    **loader_options: Any,
) -> Iterator[tuple[list[Tensor], Tensor]]:
    """``(views, boxes)`` batches from global step ``step`` on, epoch after epoch.

    Args:
        dataset: The seeded multi-crop dataset.
        sampler: This process's sampler of it.
        step: The first step to feed (a resumed run's).
        batch_size: Images per process and step.
        **loader_options: ``DataLoader`` options (workers, pinning, ``worker_init_fn``).

    """
    while True:
        epoch, offset = divmod(step, sampler.batches_per_epoch)
        sampler.epoch = dataset.epoch = epoch
        sampler.start = offset
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_options
        )
        for batch in loader:
            yield batch
            step += 1
