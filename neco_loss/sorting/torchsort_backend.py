"""Backend ``torchsort``: a soft permutation from ``torchsort.soft_rank`` (Blondel et al. 2020).

Construction. ``r = soft_rank(x, regularization="l2", regularization_strength=1 / steepness)``
gives ranks ``r_i`` in ``[1, n]`` (projection onto the permutahedron). Element ``i`` is spread over
the two integer ranks next to ``r_i`` by linear interpolation:

    perm[r, i, j] = max(0, 1 - |r_i - (j + 1)|)

so every row sums to 1, a hard rank gives a one-hot row and tied elements share their ranks.
Columns need not sum to 1 (it is not a sorting network). ``sorted_x = x @ perm`` so that the
backend keeps the interface's identity. Steepness mapping: l2 soft ranks become hard once value
gaps exceed the regularisation strength, so ``regularization_strength = 1 / steepness`` puts the
transition at the same value gap ``1 / steepness`` as the comparators of the sorting networks.
``network``, ``relaxation`` and ``art_lambda`` do not apply to this backend and are ignored.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from neco_loss.sorting.kernels.recomputing import first_order_only

INSTALL_HINT = (
    "backend='torchsort' needs torchsort: pip install 'neco-loss[torchsort]' "
    "(it compiles from source; see the README for a CPU-only build)."
)


def _import_torchsort() -> ModuleType:
    try:
        import torchsort
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return torchsort


def torchsort_soft_sort(
    x: Tensor, network: str, relaxation: str, steepness: float, art_lambda: float
) -> tuple[Tensor, Tensor]:
    """Soft-sort the rows of ``x`` through torchsort's soft ranks (see the module docstring).

    Args:
        x: ``(rows, n)`` float32 or float64, validated.
        network: Ignored (no sorting network).
        relaxation: Ignored (l2 regularisation).
        steepness: Inverse of torchsort's ``regularization_strength``.
        art_lambda: Ignored.

    Returns:
        ``sorted_x (rows, n)`` and ``perm (rows, n, n)``.

    Raises:
        ImportError: If torchsort is not installed.

    """
    torchsort = _import_torchsort()
    # torchsort's second derivative is wrong (gradgradcheck fails): refuse create_graph=True.
    ranks = torchsort.soft_rank(
        first_order_only(x, "torchsort"),
        regularization="l2",
        regularization_strength=1.0 / steepness,
    )
    positions = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    perm = (1 - (ranks.unsqueeze(-1) - positions).abs()).clamp_min(0)
    sorted_x = (x.unsqueeze(1) @ perm).squeeze(1)
    return sorted_x, perm
