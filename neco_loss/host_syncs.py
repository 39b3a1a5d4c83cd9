"""Count the tensor operations that make the host wait for the device.

On a GPU, ``bool(t)``, ``t.item()``, ``t.tolist()``, ``int(t)``, ``float(t)``, ``t.nonzero()``,
``t.cpu()`` and ``t.numpy()`` block until the device has computed ``t``: a training step should
hold as few as it can. ``count_host_syncs`` counts them (and the ``isfinite`` scans behind input
checks) on any device, CPU included, so the count can be tested without a GPU. Operations on CPU
tensors are counted too: the count is an upper bound of the syncs on a GPU.

>>> import torch
>>> with count_host_syncs() as counts:
...     flag = bool(torch.ones(3).isfinite().all())
>>> counts["__bool__"], counts["isfinite"]
(1, 1)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.overrides import TorchFunctionMode

SYNCING = frozenset(
    {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}
)
SCANS = frozenset({"isfinite"})


class _Counting(TorchFunctionMode):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNCING or name in SCANS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs() -> Iterator[Counter[str]]:
    """Count syncing operations (``SYNCING``) and ``isfinite`` scans inside the block.

    Yields:
        A ``Counter`` by operation name, filled as the block runs; ``host_syncs(counts)`` sums
        the syncing ones.

    """
    counts: Counter[str] = Counter()
    with _Counting(counts):
        yield counts


def host_syncs(counts: Counter[str]) -> int:
    """The number of syncing operations in a ``count_host_syncs`` counter."""
    return sum(count for name, count in counts.items() if name in SYNCING)
