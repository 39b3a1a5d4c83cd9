"""Comparator schedules of sorting networks, laid out for pair-wise mixing.

The schedules reproduce ``diffsort.networks`` (diffsort 0.2.0, Petersen et al. 2021) comparator
for comparator, but instead of dense split/combine matrices they describe each layer as strided
views, so a layer costs O(n) per row instead of O(n^2) (values) or O(n^3) (permutation).

Layout. A state of ``n_wires`` wires is viewed as ``(groups, group_size)``. Within a group, a
layer acts on the slice ``[start, start + 2 * chunks * half)`` viewed as ``(chunks, 2, half)``:
wire ``(c, 0, j)`` is compared with wire ``(c, 1, j)``. Each comparator has a *sign*:

* ``+1``: ascending, the minimum goes to the first wire (diffsort's default orientation);
* ``-1``: descending (bitonic merge of an odd block), the minimum goes to the second wire;
* ``0``: identity; diffsort keeps the value in place (a comparator touching a dropped wire).

Bitonic networks are split into *stages*: during stage ``b`` every comparator stays inside
groups of ``2**(b + 1)`` wires, so the soft permutation is block-diagonal and the zeros outside the
blocks are never touched (2.1x fewer updates at n = 64, see ``../shared/design.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

NETWORKS: tuple[str, ...] = ("bitonic", "odd_even")


@dataclass(frozen=True)
class Layer:
    """One layer of disjoint comparators.

    Attributes:
        start: First wire of the slice this layer acts on, within each group.
        chunks: Number of ``(2, half)`` chunks in the slice.
        half: Distance between the two wires of a comparator.
        sign: ``(groups, chunks, half)`` float tensor of comparator signs (+1, -1, 0), or ``None``
            when every comparator is ascending.
    """

    start: int
    chunks: int
    half: int
    sign: torch.Tensor | None

    @property
    def stop(self) -> int:
        """One past the last wire this layer touches, within each group."""
        return self.start + 2 * self.chunks * self.half


@dataclass(frozen=True)
class Stage:
    """Consecutive layers whose comparators all stay within groups of ``group_size`` wires."""

    groups: int
    group_size: int
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class SortingPlan:
    """A whole network for ``n`` inputs.

    Attributes:
        network: Name of the network (``"bitonic"`` or ``"odd_even"``).
        n: Number of inputs.
        n_wires: Number of wires including dropped ones (bitonic pads to a power of two).
        stages: Stages in execution order; group sizes double from one stage to the next.
    """

    network: str
    n: int
    n_wires: int
    stages: tuple[Stage, ...]

    @property
    def n_dropped(self) -> int:
        """Leading wires that carry no input (diffsort drops the *top* wires)."""
        return self.n_wires - self.n

    @property
    def n_layers(self) -> int:
        """Total number of comparator layers."""
        return sum(len(stage.layers) for stage in self.stages)


def _bitonic_plan(n: int) -> tuple[int, tuple[Stage, ...]]:
    """Bitonic network as in ``diffsort.networks.bitonic_network``.

    For n not a power of two, diffsort runs ``2**ceil(log2 n)`` wires, drops the first
    ``n_wires - n`` of them and turns every comparator that touches a dropped wire into the
    identity.
    """
    n_blocks = math.ceil(math.log2(n)) if n > 1 else 0
    n_wires = 2**n_blocks
    n_dropped = n_wires - n
    stages = []
    for block in range(n_blocks):
        group_size = 2 ** (block + 1)
        groups = n_wires // group_size
        layers = []
        for layer_in_block in range(block + 1):
            half = 2 ** (block - layer_in_block)
            chunks = group_size // (2 * half)
            wire_a = (
                torch.arange(groups).view(-1, 1, 1) * group_size
                + torch.arange(chunks).view(1, -1, 1) * 2 * half
                + torch.arange(half).view(1, 1, -1)
            )
            # diffsort: a comparator is descending when (a // 2**(block + 1)) is odd.
            descending = (wire_a // group_size) % 2 == 1
            identity = wire_a < n_dropped  # wire b = a + half >= n_dropped whenever a is kept
            sign = torch.where(descending, -1.0, 1.0).masked_fill(identity, 0.0)
            all_ascending = bool((sign == 1.0).all())
            layers.append(Layer(0, chunks, half, None if all_ascending else sign))
        stages.append(Stage(groups, group_size, tuple(layers)))
    return n_wires, tuple(stages)


def _odd_even_plan(n: int) -> tuple[int, tuple[Stage, ...]]:
    """Odd-even transposition network as in ``diffsort.networks.odd_even_network``.

    n layers; layer l compares wires ``(i, i + 1)`` for ``i = l % 2, l % 2 + 2, ...``; the
    corner wires a layer leaves out are identity comparators in diffsort, i.e. untouched here.
    """
    layers = []
    for layer in range(n):
        start = layer % 2
        chunks = (n - start) // 2
        layers.append(Layer(start, chunks, 1, None))
    return n, (Stage(1, n, tuple(layers)),)


_BUILDERS = {"bitonic": _bitonic_plan, "odd_even": _odd_even_plan}


@lru_cache(maxsize=256)
def _plan_on_cpu(network: str, n: int) -> SortingPlan:
    n_wires, stages = _BUILDERS[network](n)
    return SortingPlan(network, n, n_wires, stages)


@lru_cache(maxsize=256)
def sorting_plan(
    network: str, n: int, device: torch.device, dtype: torch.dtype
) -> SortingPlan:
    """The comparator schedule of ``network`` for ``n`` inputs, with sign tensors on ``device``.

    Args:
        network: ``"bitonic"`` or ``"odd_even"``.
        n: Number of inputs, ``n >= 1``.
        device: Device of the sign tensors.
        dtype: Floating dtype of the sign tensors (the compute dtype).

    Returns:
        The cached plan.

    Raises:
        ValueError: If ``network`` is unknown or ``n < 1``.
    """
    if network not in _BUILDERS:
        raise ValueError(f"network must be one of {list(NETWORKS)} but is {network!r}.")
    if n < 1:
        raise ValueError(f"n must be >= 1 but is {n}.")
    plan = _plan_on_cpu(network, n)
    stages = tuple(
        Stage(
            stage.groups,
            stage.group_size,
            tuple(
                Layer(
                    layer.start,
                    layer.chunks,
                    layer.half,
                    None if layer.sign is None else layer.sign.to(device=device, dtype=dtype),
                )
                for layer in stage.layers
            ),
        )
        for stage in plan.stages
    )
    return SortingPlan(plan.network, plan.n, plan.n_wires, stages)
