"""Hypothesis strategies for soft-sort inputs: the cases sorting gets wrong most easily.

Sizes include n = 1, 2, powers of two and the sizes around them; values include ties,
duplicates, constant rows, tiny and huge magnitudes, in float32 and float64.

>>> from hypothesis import given
>>> @given(score_matrices(max_n=8))
... def test_rows_are_2d(x):
...     assert x.dim() == 2 and 1 <= x.shape[1] <= 8
>>> test_rows_are_2d()
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = (torch.float64, torch.float32)
MAGNITUDES = (1e-6, 1e-3, 1.0, 1e2, 1e4)
KINDS = ("free", "ties", "constant", "two_values")


def sizes(min_n: int = 1, max_n: int = 130) -> st.SearchStrategy[int]:
    """Row lengths ``n`` in ``[min_n, max_n]``, uniform; edges and powers of two (+-1) more often.

    Shrinks towards ``min_n``, so a failure is reported at the smallest ``n`` that shows it.
    """
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n but got min_n={min_n}, max_n={max_n}.")
    special = {min_n, max_n, min(max_n, max(min_n, 2))}
    power = 1
    while power <= 2 * max_n:
        special.update(k for k in (power - 1, power, power + 1) if min_n <= k <= max_n)
        power *= 2
    # sampled_from draws uniformly (integers() favours small values) and shrinks to min_n.
    return st.one_of(st.sampled_from(range(min_n, max_n + 1)), st.sampled_from(sorted(special)))


def steepnesses(low: float = 1.0, high: float = 1000.0) -> st.SearchStrategy[float]:
    """Inverse temperatures in ``[low, high]``."""
    return st.floats(low, high)


@st.composite
def score_matrices(
    draw: st.DrawFn,
    min_n: int = 1,
    max_n: int = 24,
    max_rows: int = 4,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
) -> torch.Tensor:
    """``(rows, n)`` scores: free values, ties, constant rows or two repeated values.

    Args:
        draw: Hypothesis' draw function (supplied by ``st.composite``).
        min_n: Smallest row length.
        max_n: Largest row length.
        max_rows: Most rows.
        dtypes: Floating dtypes to draw from.

    Returns:
        A strategy of tensors, scaled by a magnitude from 1e-6 to 1e4.

    """
    n = draw(sizes(min_n, max_n))
    rows = draw(st.integers(1, max_rows))
    kind = draw(st.sampled_from(KINDS))
    magnitude = draw(st.sampled_from(MAGNITUDES))
    count = rows * n
    if kind == "free":
        unit = st.floats(-1.0, 1.0, allow_subnormal=False)
        values = draw(st.lists(unit, min_size=count, max_size=count))
    elif kind == "ties":
        ties = st.sampled_from([-1.0, 0.0, 0.5, 1.0])
        values = draw(st.lists(ties, min_size=count, max_size=count))
    elif kind == "constant":
        values = [draw(st.floats(-1.0, 1.0))] * count
    else:
        values = draw(st.lists(st.sampled_from([0.25, -0.75]), min_size=count, max_size=count))
    dtype = draw(st.sampled_from(dtypes))
    return torch.tensor(values, dtype=torch.float64).view(rows, n).mul(magnitude).to(dtype)


@st.composite
def separated_rows(
    draw: st.DrawFn, min_n: int = 1, max_n: int = 24, max_rows: int = 4
) -> tuple[torch.Tensor, float]:
    """``(rows, n)`` float64 rows, each a random permutation of ``0, gap, ..., (n - 1) gap``.

    Returns:
        A strategy of ``(x, gap)``; every two values of a row differ by at least ``gap``.

    """
    n = draw(sizes(min_n, max_n))
    rows = draw(st.integers(1, max_rows))
    gap = draw(st.sampled_from([0.5, 1.0, 10.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    order = torch.stack([torch.randperm(n, generator=generator) for _ in range(rows)])
    return order.to(torch.float64) * gap, gap
