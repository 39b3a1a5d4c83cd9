"""Hypothesis strategies for score matrices with the cases sorting gets wrong most easily."""

import torch
from hypothesis import given
from hypothesis import strategies as st

SORTING_NETWORK_BACKENDS = ["native", "diffsort"]
BACKENDS = ["native", "diffsort", "torchsort"]
NETWORKS = ["bitonic", "bitonic_padded", "odd_even"]
RELAXATIONS = ["cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal"]

steepnesses = st.floats(1.0, 1000.0)
networks = st.sampled_from(NETWORKS)
relaxations = st.sampled_from(RELAXATIONS)


@st.composite
def score_matrices(draw, max_n: int = 24, max_rows: int = 4) -> torch.Tensor:
    """``(rows, n)`` float64 scores: ties, duplicates, constant rows, tiny and huge magnitudes."""
    n = draw(st.integers(1, max_n))
    rows = draw(st.integers(1, max_rows))
    kind = draw(st.sampled_from(["free", "ties", "constant", "two_values"]))
    magnitude = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e2, 1e4]))
    if kind == "free":
        unit = st.floats(-1.0, 1.0, allow_subnormal=False)
        values = draw(st.lists(unit, min_size=rows * n, max_size=rows * n))
    elif kind == "ties":
        values = draw(
            st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), min_size=rows * n, max_size=rows * n)
        )
    elif kind == "constant":
        values = [draw(st.floats(-1.0, 1.0))] * (rows * n)
    else:
        values = draw(
            st.lists(st.sampled_from([0.25, -0.75]), min_size=rows * n, max_size=rows * n)
        )
    return torch.tensor(values, dtype=torch.float64).view(rows, n) * magnitude


@st.composite
def separated_rows(draw, max_n: int = 24) -> tuple[torch.Tensor, float]:
    """``(2, n)`` float64 rows of distinct values at least ``gap`` apart, and the gap."""
    n = draw(st.integers(1, max_n))
    gap = draw(st.sampled_from([0.5, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=generator) for _ in range(2)])
    return order.to(torch.float64) * gap, gap


def supported(backend: str, network: str, n: int) -> bool:
    """Whether ``soft_permutation`` accepts this combination (else it raises ValueError)."""
    from neco_loss.sorting.networks import sorts_every_input

    if backend == "diffsort" and network == "bitonic_padded":
        return False
    return sorts_every_input(network, n)


def given_score_cases(test):
    """Run ``test(backend, x, steepness, network, relaxation)`` on generated score matrices."""
    return given(
        x=score_matrices(), steepness=steepnesses, network=networks, relaxation=relaxations
    )(test)
