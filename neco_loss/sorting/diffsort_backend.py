"""Backend ``diffsort``: the reference implementation, ``diffsort`` 0.2.0 (Petersen et al.).

Used by the NeCo reference code; kept as a backend for parity checks and comparisons. It
multiplies dense split/combine matrices per layer and keeps every layer for backward.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from neco_loss.sorting.networks import check_sorts

DIFFSORT_NETWORKS = ("bitonic", "odd_even")
INSTALL_HINT = "backend='diffsort' needs diffsort 0.2.0: pip install 'neco-loss[diffsort]'."


def _import_diffsort() -> ModuleType:
    try:
        import diffsort
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return diffsort


@lru_cache(maxsize=64)
def _network(network: str, n: int, device: torch.device) -> list:
    diffsort = _import_diffsort()
    return diffsort.networks.get_sorting_network(network, n, device)


def diffsort_soft_sort(
    x: Tensor, network: str, relaxation: str, steepness: float, art_lambda: float
) -> tuple[Tensor, Tensor]:
    """Soft-sort the rows of ``x`` with ``diffsort.functional.sort``.

    Args:
        x: ``(rows, n)`` float32 or float64, validated.
        network: ``"bitonic"`` or ``"odd_even"`` (diffsort has no ``"bitonic_padded"``).
        relaxation: diffsort's ``distribution`` name.
        steepness: Inverse temperature.
        art_lambda: Exponent of ``logistic_phi``.

    Returns:
        ``sorted_x (rows, n)`` and ``perm (rows, n, n)`` (``perm[r, i, j]``: element i at rank j).

    Raises:
        ImportError: If diffsort is not installed.
        ValueError: For ``"bitonic_padded"``, or an n at which diffsort's layout mis-sorts.

    """
    diffsort = _import_diffsort()
    if network not in DIFFSORT_NETWORKS:
        raise ValueError(
            f"backend='diffsort' supports network in {list(DIFFSORT_NETWORKS)} but got {network!r}."
        )
    check_sorts(network, x.shape[1])
    if x.shape[1] == 1:
        # diffsort cannot run its empty n = 1 network; the trivial answer stays in x's graph so
        # that a loss built on it can still call backward(), as with the other backends.
        return x, (x * 0 + 1).unsqueeze(-1)
    layers = _network(network, x.shape[1], x.device)
    return diffsort.functional.sort(layers, x, steepness, art_lambda, relaxation)
