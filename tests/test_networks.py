"""The native comparator schedules are diffsort's networks, comparator for comparator."""

import numpy as np
import pytest
import torch
from diffsort.networks import bitonic_network, odd_even_network

from neco_loss import soft_permutation
from neco_loss.sorting.networks import (
    _plan_on_cpu,
    hard_sort_ranks,
    sorting_plan,
    sorts_every_input,
)


def diffsort_comparators(layers) -> list[set[tuple[int, int, str]]]:
    """Per layer: (wire receiving the min, wire receiving the max, kind) of every real comparator.

    Read off diffsort's split/combine matrices; identity comparators (a wire compared with
    itself, or with a dropped wire) are left out since they keep the value in place.
    """
    result = []
    for split_a, split_b, combine_min, combine_max in layers:
        comparators = set()
        for k in range(split_a.shape[0]):
            a, b = int(np.argmax(split_a[k])), int(np.argmax(split_b[k]))
            if a == b:
                continue
            to_min, to_max = int(np.argmax(combine_min[:, k])), int(np.argmax(combine_max[:, k]))
            comparators.add((a, b, "asc" if (to_min, to_max) == (a, b) else "desc"))
        result.append(comparators)
    return result


def native_comparators(plan) -> list[set[tuple[int, int, str]]]:
    """The same description read off a native plan, in unpadded wire indices."""
    result = []
    for stage in plan.stages:
        for layer in stage.layers:
            comparators = set()
            for g in range(stage.groups):
                for c in range(layer.chunks):
                    for j in range(layer.half):
                        a = g * stage.group_size + layer.start + c * 2 * layer.half + j
                        b = a + layer.half
                        sign = 1.0 if layer.sign is None else float(layer.sign[g, c, j])
                        if sign == 0.0:
                            continue
                        kind = "asc" if sign > 0 else "desc"
                        comparators.add((a - plan.n_dropped, b - plan.n_dropped, kind))
            result.append(comparators)
    return result


@pytest.mark.parametrize("n", list(range(1, 70)) + [127, 128, 129, 130])
def test_bitonic_matches_diffsort(n: int) -> None:
    plan = _plan_on_cpu("bitonic", n)  # the layout itself, also where it mis-sorts
    expected = diffsort_comparators(bitonic_network(n)) if n > 1 else []
    assert native_comparators(plan) == expected


@pytest.mark.parametrize("n", list(range(1, 70)) + [130])
def test_odd_even_matches_diffsort(n: int) -> None:
    plan = sorting_plan("odd_even", n, torch.device("cpu"), torch.float64)
    assert native_comparators(plan) == diffsort_comparators(odd_even_network(n))


def test_bitonic_groups_double_per_stage() -> None:
    plan = sorting_plan("bitonic", 49, torch.device("cpu"), torch.float32)
    assert plan.n_wires == 64 and plan.n_dropped == 15
    assert [s.group_size for s in plan.stages] == [2, 4, 8, 16, 32, 64]
    assert plan.n_layers == 21


def test_unknown_network_lists_valid_names() -> None:
    with pytest.raises(
        ValueError,
        match=r"network must be one of \['bitonic', 'bitonic_padded', 'odd_even'\].*'quick'",
    ):
        sorting_plan("quick", 4, torch.device("cpu"), torch.float32)


def test_diffsort_bitonic_layout_mis_sorts_these_sizes():
    broken = [n for n in range(1, 100) if not sorts_every_input("bitonic", n)]
    assert broken == [22, 38, 42, 43, 44, 45, 46, 54, 70, 74, 75, 76, 77, 78] + list(range(82, 95))


@pytest.mark.parametrize("n", [22, 45])
def test_mis_sorting_is_diffsorts_own_behaviour(n):
    """The counterexample our hard simulation finds also mis-sorts in diffsort itself."""
    plan = _plan_on_cpu("bitonic", n)
    generator = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(n, generator=generator) for _ in range(64)])
    wrong = (hard_sort_ranks(plan, perms.double()) != perms).any(dim=1)
    counterexample = perms[wrong][:1].double()
    from diffsort import DiffSortNet

    _, perm = DiffSortNet("bitonic", n, steepness=1e4)(counterexample)
    assert not torch.equal(perm.argmax(dim=2), counterexample.long())


@pytest.mark.parametrize("network", ["bitonic_padded", "odd_even"])
@pytest.mark.parametrize("n", range(1, 15))
def test_zero_one_principle(network, n):
    """A comparator network sorts every input iff it sorts every 0-1 input (Knuth 5.3.4)."""
    plan = _plan_on_cpu(network, n)
    bits = (torch.arange(2**n).unsqueeze(1) >> torch.arange(n)) & 1
    # distinct values that order like the bits, ties broken by position
    values = bits.double() * n + torch.arange(n)
    ranks = hard_sort_ranks(plan, values)
    assert torch.equal(ranks, values.argsort(dim=1).argsort(dim=1))


@pytest.mark.parametrize("n", [3, 22, 45, 100, 130])
def test_padded_bitonic_sorts_softly_too(n):
    x = torch.stack(
        [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    )
    _, perm = soft_permutation(x.double(), "bitonic_padded", steepness=1000.0)
    assert torch.equal(perm.argmax(dim=2), x)
