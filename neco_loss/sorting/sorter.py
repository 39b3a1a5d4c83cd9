"""One interface over the soft sorting backends, selected by name.

>>> import torch
>>> from neco_loss import soft_permutation
>>> sorted_x, perm = soft_permutation(torch.tensor([[3.0, 1.0, 2.0]]), steepness=100.0)
>>> perm.argmax(dim=2)  # rank of each element
tensor([[2, 0, 1]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from neco_loss.checks import check_choice, check_float_tensor, check_positive_finite, compute_dtype
from neco_loss.sorting import kernels
from neco_loss.sorting.diffsort_backend import diffsort_soft_sort
from neco_loss.sorting.native import native_soft_sort
from neco_loss.sorting.networks import NETWORKS, sorting_plan
from neco_loss.sorting.relaxations import RELAXATIONS, get_relaxation
from neco_loss.sorting.torchsort_backend import torchsort_soft_sort

BackendFn = Callable[[Tensor, str, str, float, float], tuple[Tensor, Tensor]]


def _native_python(
    x: Tensor, network: str, relaxation: str, steepness: float, art_lambda: float
) -> tuple[Tensor, Tensor]:
    plan = sorting_plan(network, x.shape[1], x.device, x.dtype)
    return native_soft_sort(x, plan, get_relaxation(relaxation), steepness, art_lambda)


def _native(
    x: Tensor, network: str, relaxation: str, steepness: float, art_lambda: float
) -> tuple[Tensor, Tensor]:
    """The device's kernel (``neco_loss.sorting.kernels.kernel_for``), else the PyTorch backend."""
    kernel = kernels.kernel_for(x, network, relaxation)
    if kernel is None:
        return _native_python(x, network, relaxation, steepness, art_lambda)
    return kernel.soft_sort(x, kernels.SortSettings(network, relaxation, steepness, art_lambda))


BACKENDS: dict[str, BackendFn] = {
    "native": _native,
    "native-python": _native_python,
    "diffsort": diffsort_soft_sort,
    "torchsort": torchsort_soft_sort,
}


@dataclass(frozen=True)
class SoftSorter:
    """A configured soft sorting network; call it on ``(rows, n)`` scores.

    Attributes:
        network: ``"bitonic"`` (default) or ``"odd_even"``.
        backend: ``"native"`` (default: the compiled kernel where it runs, else
            ``"native-python"``), ``"native-python"`` (pure PyTorch), ``"diffsort"`` or
            ``"torchsort"``.
        relaxation: Swap probability, diffsort's names; ``"cauchy"`` is diffsort 0.2.0's default.
        steepness: Inverse temperature, > 0 (reference code: 100).
        art_lambda: Exponent of ``logistic_phi`` (diffsort's default 0.25).

    """

    network: str = "bitonic"
    backend: str = "native"
    relaxation: str = "cauchy"
    steepness: float = 100.0
    art_lambda: float = 0.25

    def __post_init__(self) -> None:
        check_choice(self.network, "network", NETWORKS)
        check_choice(self.backend, "backend", BACKENDS)
        check_choice(self.relaxation, "relaxation", RELAXATIONS)
        check_positive_finite(self.steepness, "steepness")
        check_positive_finite(self.art_lambda, "art_lambda")

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Soft-sort every row of ``x`` ascending.

        Args:
            x: ``(rows, n)`` floating tensor, ``n >= 1``, finite. Half types are computed and
                returned in float32.

        Returns:
            ``sorted_x (rows, n)`` ascending and ``perm (rows, n, n)``, ``perm[r, i, j]`` the
            probability that element ``i`` lands at rank ``j``;
            ``sorted_x = (x.unsqueeze(1) @ perm).squeeze(1)``.

        Raises:
            TypeError: If ``x`` is not a floating tensor.
            ValueError: If ``x`` is not 2-D, has no column, or holds NaN/Inf.

        """
        return self.sort_valid(prepare_scores(x, "x"))

    def sort_valid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``__call__`` for scores already checked: no validation, so no host sync.

        Args:
            x: ``(rows, n)`` float32 or float64, finite, ``n >= 1`` (as ``prepare_scores``
                returns it).

        Returns:
            ``sorted_x (rows, n)`` and ``perm (rows, n, n)`` as ``__call__``.

        """
        return BACKENDS[self.backend](
            x, self.network, self.relaxation, float(self.steepness), float(self.art_lambda)
        )


def prepare_scores(x: Tensor, name: str) -> Tensor:
    """Validate ``(rows, n)`` scores and return them in their compute dtype (half -> float32).

    Raises:
        TypeError: If ``x`` is not a floating tensor.
        ValueError: If ``x`` is not 2-D, has no column, or holds NaN/Inf.

    """
    check_float_tensor(x, name, dims=2)
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have n >= 1 columns but has shape {tuple(x.shape)}.")
    return x.to(compute_dtype(x.dtype))


def get_sorter(
    network: str = "bitonic",
    *,
    backend: str = "native",
    relaxation: str = "cauchy",
    steepness: float = 100.0,
    art_lambda: float = 0.25,
) -> SoftSorter:
    """Build a soft sorter from names, as configs spell them.

    Args:
        network: One of ``NETWORKS``.
        backend: One of ``BACKENDS``.
        relaxation: One of ``RELAXATIONS``.
        steepness: Inverse temperature, > 0.
        art_lambda: Exponent of ``logistic_phi``, > 0.

    Returns:
        The sorter.

    Raises:
        ValueError: For an unknown name (the message lists the valid ones) or a steepness that
            is not finite and positive.

    """
    return SoftSorter(network, backend, relaxation, steepness, art_lambda)


def soft_permutation(
    x: Tensor,
    network: str = "bitonic",
    steepness: float = 100.0,
    relaxation: str = "cauchy",
    backend: str = "native",
    art_lambda: float = 0.25,
) -> tuple[Tensor, Tensor]:
    """Soft-sort the rows of ``x`` and return the soft permutation matrices.

    Defaults reproduce the NeCo reference code: ``diffsort.DiffSortNet("bitonic", n,
    steepness=100)`` with diffsort 0.2.0's Cauchy relaxation.

    Args:
        x: ``(rows, n)`` floating tensor, finite, ``n >= 1``.
        network: ``"bitonic"`` or ``"odd_even"``.
        steepness: Inverse temperature, > 0.
        relaxation: ``"cauchy"``, ``"logistic"``, ``"logistic_phi"``, ``"gaussian"``,
            ``"reciprocal"`` or ``"optimal"``.
        backend: ``"native"``, ``"diffsort"`` or ``"torchsort"``.
        art_lambda: Exponent of ``logistic_phi``.

    Returns:
        ``sorted_x (rows, n)`` and ``perm (rows, n, n)``; see ``SoftSorter.__call__``.

    Examples:
        >>> import torch
        >>> sorted_x, perm = soft_permutation(torch.randn(8, 49))
        >>> perm.shape
        torch.Size([8, 49, 49])

    """
    return get_sorter(
        network, backend=backend, relaxation=relaxation, steepness=steepness, art_lambda=art_lambda
    )(x)
