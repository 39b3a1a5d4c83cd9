"""Comparator schedules of sorting networks, laid out for pair-wise mixing.

The schedules reproduce ``diffsort.networks`` (diffsort 0.2.0, Petersen et al. 2021) comparator
for comparator, but instead of dense split/combine matrices they describe each layer as strided
views, so a layer costs O(n) per row instead of O(n^2) (values) or O(n^3) (permutation).

Layout. A state of ``n_wires`` wires is viewed as ``(groups, group_size)``. Within a group, a
layer acts on the slice ``[start, start + 2 * chunks * half)`` viewed as ``(chunks, 2, half)``:
wire ``(c, 0, j)`` is compared with wire ``(c, 1, j)``. Each comparator has a *sign*:

* ``+1``: ascending, the minimum goes to the first wire (diffsort's default orientation);
* ``-1``: descending (bitonic merge of an odd block), the minimum goes to the second wire;
* ``0``: a fixed (hard) comparator: ``fixed = 1`` keeps both wires in place (diffsort's
  treatment of a comparator touching a dropped wire), ``fixed = 0`` swaps them (``bitonic_padded``
  moving a padding wire).

Bitonic networks are split into *stages*: during stage ``b`` every comparator stays inside
groups of ``2**(b + 1)`` wires, so the soft permutation is block-diagonal and the zeros outside the
blocks are never touched (2.1x fewer updates at n = 64, see ``../shared/design.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

NETWORKS: tuple[str, ...] = ("bitonic", "bitonic_padded", "odd_even")
VALIDITY_TRIALS = 512  # random permutations a bitonic layout must sort before it is used


@dataclass(frozen=True)
class Layer:
    """One layer of disjoint comparators.

    Attributes:
        start: First wire of the slice this layer acts on, within each group.
        chunks: Number of ``(2, half)`` chunks in the slice.
        half: Distance between the two wires of a comparator.
        sign: ``(groups, chunks, half)`` float tensor of comparator signs (+1, -1, 0), or ``None``
            when every comparator is ascending.
        fixed: ``(groups, chunks, half)`` weight ``c1`` of the fixed comparators (sign 0): 1 keeps
            the wires, 0 swaps them; ``None`` when ``sign`` is ``None``.

    """

    start: int
    chunks: int
    half: int
    sign: torch.Tensor | None
    fixed: torch.Tensor | None = None

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


def _bitonic_plan(n: int, track_padding: bool) -> tuple[int, tuple[Stage, ...]]:
    """Bitonic network on ``2**ceil(log2 n)`` wires whose first ``n_wires - n`` wires are padding.

    With ``track_padding=False`` this is ``diffsort.networks.bitonic_network``: every comparator
    that touches a padding wire is the identity. That is only right for ascending comparators;
    for some n (22, 38, 42-46, 54, ...) the result is not a sorting network (see
    ``check_sorts``). With ``track_padding=True`` padding wires act as -inf: a comparator between
    a padding and a real wire sends the padding to the minimum's wire (a hard keep or a hard
    swap), which sorts every n; positions of the padding depend on n only, never on the data.
    """
    n_blocks = math.ceil(math.log2(n)) if n > 1 else 0
    n_wires = 2**n_blocks
    is_padding = torch.arange(n_wires) < n_wires - n
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
            wire_b = wire_a + half
            # diffsort: a comparator is descending when (a // 2**(block + 1)) is odd.
            descending = (wire_a // group_size) % 2 == 1
            pad_a, pad_b = is_padding[wire_a], is_padding[wire_b]
            hard = pad_a | pad_b
            sign = torch.where(descending, -1.0, 1.0).masked_fill(hard, 0.0)
            # The padding must end on the minimum's wire: a if ascending, b if descending.
            swap = (
                (pad_a ^ pad_b) & (pad_b ^ descending) if track_padding else torch.zeros_like(hard)
            )
            fixed = (~swap).to(torch.float64)
            is_padding[wire_a.flatten()], is_padding[wire_b.flatten()] = (
                torch.where(swap, pad_b, pad_a).flatten(),
                torch.where(swap, pad_a, pad_b).flatten(),
            )
            all_ascending = bool((sign == 1.0).all())
            layers.append(
                Layer(0, chunks, half, None, None)
                if all_ascending
                else Layer(0, chunks, half, sign, fixed)
            )
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


_BUILDERS = {
    "bitonic": lambda n: _bitonic_plan(n, track_padding=False),
    "bitonic_padded": lambda n: _bitonic_plan(n, track_padding=True),
    "odd_even": _odd_even_plan,
}


def hard_sort_ranks(plan: SortingPlan, values: torch.Tensor) -> torch.Tensor:
    """Run ``plan`` as a hard comparator network and return the rank each element ends at.

    Args:
        plan: The network.
        values: ``(rows, n)`` distinct values.

    Returns:
        ``(rows, n)`` integer ranks, ``-1`` where an element ended on a padding wire.

    """
    rows = values.shape[0]
    wires = torch.cat((values.new_full((rows, plan.n_dropped), -math.inf), values), dim=1)
    element = torch.cat(
        (torch.full((rows, plan.n_dropped), -1), torch.arange(plan.n).expand(rows, -1)), dim=1
    )
    for stage in plan.stages:
        wires = wires.reshape(rows, stage.groups, stage.group_size)
        element = element.reshape(rows, stage.groups, stage.group_size)
        for layer in stage.layers:
            pairs = [
                state[:, :, layer.start : layer.stop].unflatten(2, (layer.chunks, 2, layer.half))
                for state in (wires, element)
            ]
            first, second = pairs[0][:, :, :, 0], pairs[0][:, :, :, 1]
            sign = torch.ones(()) if layer.sign is None else layer.sign.cpu()
            fixed = torch.ones(()) if layer.fixed is None else layer.fixed.cpu()
            keep = torch.where(sign > 0, first <= second, fixed.bool())
            keep = torch.where(sign < 0, first >= second, keep)
            for state in pairs:
                first, second = state[:, :, :, 0].clone(), state[:, :, :, 1].clone()
                state[:, :, :, 0] = torch.where(keep, first, second)
                state[:, :, :, 1] = torch.where(keep, second, first)
    ranks = torch.full((rows, plan.n), -1)
    element = element.reshape(rows, plan.n_wires)[:, plan.n_dropped :]
    real = element >= 0
    positions = torch.arange(plan.n).expand(rows, -1)
    ranks[real.nonzero()[:, 0], element[real]] = positions[real]
    return ranks


@lru_cache(maxsize=256)
def sorts_every_input(network: str, n: int) -> bool:
    """Whether the hard version of ``network`` sorts ``VALIDITY_TRIALS`` random permutations.

    A failure is certain proof that the layout is not a sorting network; diffsort's bitonic
    layout fails for n = 22, 38, 42-46, 54, ... (tests check which).
    """
    plan = _plan_on_cpu(network, n)
    generator = torch.Generator().manual_seed(n)
    perms = torch.stack([torch.randperm(n, generator=generator) for _ in range(VALIDITY_TRIALS)])
    return bool((hard_sort_ranks(plan, perms.to(torch.float64)) == perms).all())


@lru_cache(maxsize=256)
def _plan_on_cpu(network: str, n: int) -> SortingPlan:
    n_wires, stages = _BUILDERS[network](n)
    return SortingPlan(network, n, n_wires, stages)


def check_sorts(network: str, n: int) -> None:
    """Raise unless ``network`` is known and sorts ``n`` inputs.

    Raises:
        ValueError: If ``network`` is unknown, ``n < 1``, or the layout mis-sorts some inputs of
            size ``n`` (diffsort 0.2.0's bitonic layout at n = 22, 38, 42-46, 54, 70, ...).

    """
    if network not in _BUILDERS:
        raise ValueError(f"network must be one of {list(NETWORKS)} but is {network!r}.")
    if n < 1:
        raise ValueError(f"n must be >= 1 but is {n}.")
    if not sorts_every_input(network, n):
        raise ValueError(
            f"network='{network}' for n={n} is not a sorting network: diffsort 0.2.0's bitonic "
            "layout for sizes that are not a power of two drops its padding wires and mis-sorts "
            "some inputs at this n. Use network='bitonic_padded' (a bitonic network that sorts "
            "every n) or 'odd_even', or another n."
        )


@lru_cache(maxsize=256)
def sorting_plan(network: str, n: int, device: torch.device, dtype: torch.dtype) -> SortingPlan:
    """The comparator schedule of ``network`` for ``n`` inputs, with sign tensors on ``device``.

    Args:
        network: ``"bitonic"``, ``"bitonic_padded"`` or ``"odd_even"``.
        n: Number of inputs, ``n >= 1``.
        device: Device of the sign tensors.
        dtype: Floating dtype of the sign tensors (the compute dtype).

    Returns:
        The cached plan.

    Raises:
        ValueError: If ``network`` is unknown, ``n < 1``, or the network does not sort ``n``
            inputs (diffsort's bitonic layout at some n).

    """
    check_sorts(network, n)
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
                    None if layer.fixed is None else layer.fixed.to(device=device, dtype=dtype),
                )
                for layer in stage.layers
            ),
        )
        for stage in plan.stages
    )
    return SortingPlan(plan.network, plan.n, plan.n_wires, stages)
