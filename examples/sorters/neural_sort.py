"""NeuralSort (Grover et al., ICLR 2019) as a sorter to check: ``neco check-sorter`` shows what
its relaxed permutation guarantees and what it does not.

NeuralSort's ``P[k, i]`` (rank k, element i) is a softmax over the elements for each rank:
``P[k] = softmax(((n + 1 - 2 k) s - |s - s^T| 1) / tau)`` (ranks descending). Every rank's
probabilities sum to 1, but an element's probabilities over the ranks need not: it is not a
doubly stochastic matrix, unlike the sorting networks.

    neco check-sorter examples.sorters.neural_sort:neural_sort --n 1..16 --max-examples 20
"""

import torch


def neural_sort(x: torch.Tensor, steepness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_x, perm)`` of ``x (rows, n)``, ascending; ``perm[r, i, j]``: element i, rank j."""
    n = x.shape[1]
    pairwise = (x.unsqueeze(2) - x.unsqueeze(1)).abs().sum(dim=2)  # (rows, n): |s - s^T| 1
    scale = n + 1 - 2 * torch.arange(1, n + 1, dtype=x.dtype)  # (n,) ranks descending
    logits = (scale.view(1, n, 1) * x.unsqueeze(1) - pairwise.unsqueeze(1)) * steepness
    descending = logits.softmax(dim=2)  # (rows, rank, element)
    perm = descending.flip(1).transpose(1, 2)  # (rows, element, rank ascending)
    return (x.unsqueeze(1) @ perm).squeeze(1), perm
