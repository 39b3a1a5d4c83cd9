"""What every sorting kernel reads: relaxation codes, sort settings and the flattened network.

One definition for the C++ (CPU) and the Triton (CUDA) kernels: ``RELAXATION_CODES`` is the
numbering of ``enum Relaxation`` in ``csrc/soft_sort.cpp`` and of the ``KIND`` constants of the
Triton kernels; ``flat_plan`` flattens ``neco_loss.sorting.networks.sorting_plan`` once into
comparator lists (the C++ kernel's layout), from which the Triton kernels derive their per-wire
tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from neco_loss.sorting.networks import sorting_plan

COLUMN_BLOCK = 8  # soft_sort.cpp's kColumnBlock: comparators mix whole blocks of columns
RELAXATION_CODES = {  # soft_sort.cpp's enum Relaxation; the Triton kernels' KIND
    "cauchy": 0,
    "logistic": 1,
    "logistic_phi": 2,
    "gaussian": 3,
    "reciprocal": 4,
    "optimal": 5,
}


@dataclass(frozen=True)
class SortSettings:
    """One soft sort as a kernel runs it.

    Attributes:
        network: Sorting network name (``neco_loss.sorting.NETWORKS``).
        relaxation: Swap-probability name (``neco_loss.sorting.RELAXATIONS``).
        steepness: Inverse temperature, > 0.
        art_lambda: Exponent of ``logistic_phi``.

    """

    network: str
    relaxation: str
    steepness: float
    art_lambda: float = 0.25

    @property
    def code(self) -> int:
        """The relaxation's kernel code (``RELAXATION_CODES``)."""
        return RELAXATION_CODES[self.relaxation]


@dataclass(frozen=True)
class FlatPlan:
    """A sorting network as comparator lists (CPU tensors).

    Attributes:
        n: Number of inputs.
        n_wires: Wires including the leading dropped ones.
        layer_offsets: ``(L + 1,)`` int64: comparators of layer ``l`` are
            ``layer_offsets[l] .. layer_offsets[l + 1] - 1``.
        comparators: ``(C, 5)`` int64: wire a, wire b, sign (+1 ascending, -1 descending, 0
            fixed), first and one-past-last permutation column the comparator can reach.
        fixed: ``(C,)`` float64: ``c1`` of the fixed comparators (1 keep, 0 swap).
        tape_offsets: ``(C + 1,)`` int64: where the C++ backward keeps each comparator's input
            difference of its two rows (one number per column it reaches).

    """

    n: int
    n_wires: int
    layer_offsets: Tensor
    comparators: Tensor
    fixed: Tensor
    tape_offsets: Tensor

    @property
    def n_dropped(self) -> int:
        """Leading wires that carry no input."""
        return self.n_wires - self.n

    @property
    def n_layers(self) -> int:
        """Number of layers ``L``."""
        return len(self.layer_offsets) - 1

    def arguments(self) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """The plan arguments of every C++ entry point, in order."""
        return self.layer_offsets, self.comparators, self.fixed, self.tape_offsets, self.n_wires


@lru_cache(maxsize=256)
def flat_plan(network: str, n: int) -> FlatPlan:
    """``network`` for ``n`` inputs as comparator lists (see ``FlatPlan``); cached.

    Raises:
        ValueError: As ``sorting_plan`` (unknown network, or a layout that mis-sorts ``n``).

    """
    plan = sorting_plan(network, n, torch.device("cpu"), torch.float64)
    dropped = plan.n_dropped
    rows: list[Tensor] = []
    fixed: list[Tensor] = []
    offsets = [0]
    for stage in plan.stages:
        group_first = torch.arange(stage.groups) * stage.group_size
        for layer in stage.layers:
            shape = (stage.groups, layer.chunks, layer.half)
            wire_a = (
                group_first.view(-1, 1, 1)
                + layer.start
                + torch.arange(layer.chunks).view(1, -1, 1) * 2 * layer.half
                + torch.arange(layer.half).view(1, 1, -1)
            ).expand(shape)
            sign = torch.ones(shape) if layer.sign is None else layer.sign
            layer_fixed = torch.ones(shape) if layer.fixed is None else layer.fixed
            # Permutation columns a comparator can reach: the elements that started in its group.
            # Rounded out to whole column blocks (zero columns in both rows, harmless).
            first = (group_first - dropped).clamp(min=0) // COLUMN_BLOCK * COLUMN_BLOCK
            last = (group_first + stage.group_size - dropped).clamp(min=0)
            last = (last + COLUMN_BLOCK - 1) // COLUMN_BLOCK * COLUMN_BLOCK
            first, last = first.view(-1, 1, 1).expand(shape), last.view(-1, 1, 1)
            columns = torch.stack(
                [wire_a, wire_a + layer.half, sign.long(), first, last.expand(shape)], dim=-1
            )
            # Fixed comparators that keep both wires (diffsort's around its dropped wires) are
            # identities for values, permutation and gradient alike: leave them out.
            active = ~((sign == 0) & (layer_fixed == 1)).reshape(-1)
            rows.append(columns.reshape(-1, 5)[active])
            fixed.append(layer_fixed.reshape(-1).double()[active])
            offsets.append(offsets[-1] + rows[-1].shape[0])
    comparators = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.long)
    widths = comparators[:, 4] - comparators[:, 3]
    tape = torch.cat([torch.zeros(1, dtype=torch.long), widths.cumsum(0)])
    return FlatPlan(
        n,
        plan.n_wires,
        torch.tensor(offsets, dtype=torch.long),
        comparators.contiguous(),
        (torch.cat(fixed) if fixed else torch.zeros(0, dtype=torch.float64)).contiguous(),
        tape.contiguous(),
    )
