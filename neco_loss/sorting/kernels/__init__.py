"""Sorting kernels behind one dispatch: C++ on the CPU, Triton on CUDA, else none.

``kernel_for(x, network, relaxation)`` is the one place where a device picks its kernel; the
sorter (``backend="native"``) and the fused sort+CE of the NeCo loss both ask it, and fall back
to the PyTorch backend when it returns ``None``. Every kernel module offers the same three
functions: ``usable(x, network, relaxation)``, ``soft_sort(x, SortSettings)`` and
``sort_cross_entropy(student, teacher, CrossEntropySettings)``. The kernels know nothing of
NeCo: ``CrossEntropySettings.on_permutations`` defines what the fused CE computes.

>>> import torch
>>> from neco_loss.sorting.kernels import kernel_for
>>> kernel_for(torch.zeros(2, 5, dtype=torch.int64), "bitonic", "cauchy") is None
True
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from neco_loss.sorting.kernels.cross_entropy import CrossEntropySettings
from neco_loss.sorting.kernels.plan import RELAXATION_CODES, SortSettings

KERNELS_BY_DEVICE: dict[str, str] = {"cpu": "cpp", "cuda": "triton_sort"}
"""Kernel module (in this package) of each device type; imported on first use, so Triton is
imported for CUDA tensors only."""


def kernel_for(x: Tensor, network: str, relaxation: str) -> ModuleType | None:
    """The kernel module that sorts ``x``'s rows, or ``None`` for the PyTorch backend.

    Args:
        x: ``(rows, n)`` scores (float32 or float64 take a kernel).
        network: Sorting network name.
        relaxation: Swap-probability name.

    Returns:
        ``cpp`` (CPU, when the extension builds), ``triton_sort`` (CUDA, for the relaxations
        it implements, once verified; both in ``neco_loss.sorting.kernels``), or ``None``.

    """
    name = KERNELS_BY_DEVICE.get(x.device.type)
    if name is None or x.dtype not in (torch.float32, torch.float64):
        return None
    kernel = importlib.import_module(f"neco_loss.sorting.kernels.{name}")
    return kernel if kernel.usable(x, network, relaxation) else None


__all__ = [
    "KERNELS_BY_DEVICE",
    "RELAXATION_CODES",
    "CrossEntropySettings",
    "SortSettings",
    "kernel_for",
]
