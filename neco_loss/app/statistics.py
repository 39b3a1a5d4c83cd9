"""Means with Student-t confidence intervals, for results over seeds.

A run's score depends on its seed (initialisation of the heads, crops, data order, reference
draws), so a comparison of two settings is only meaningful against that spread: ablations
report ``mean ± half-width`` of a 95% interval over seeds, and the demo reports the paired
interval of the per-seed change (the same seed before and after NeCo).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class MeanInterval:
    """Sample mean of ``count`` values and the half-width of its confidence interval.

    Attributes:
        mean: Sample mean.
        half_width: ``t_{(1 + confidence) / 2, count - 1} * s / sqrt(count)``; ``None`` for a
            single value (no spread to estimate).
        count: Number of values.
        confidence: Level of the interval.

    """

    mean: float
    half_width: float | None
    count: int
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float | None:
        """Lower end of the interval (``None`` without one)."""
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        """Upper end of the interval (``None`` without one)."""
        return None if self.half_width is None else self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0 (False without an interval)."""
        if self.half_width is None:
            return False
        return abs(self.mean) > self.half_width

    def format(self, digits: int = 4, signed: bool = False) -> str:
        """``"0.4123 ± 0.0101"``, the mean alone for one value; ``signed`` adds the mean's sign."""
        mean = f"{self.mean:{'+' if signed else ''}.{digits}f}"
        if self.half_width is None:
            return mean
        return f"{mean} ± {self.half_width:.{digits}f}"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean of ``values`` and its two-sided Student-t confidence interval.

    Args:
        values: One finite number per seed.
        confidence: Level of the interval, in (0, 1).

    Returns:
        The ``MeanInterval``.

    Raises:
        ValueError: If ``values`` is empty or holds a non-finite number, or ``confidence`` is
            outside (0, 1).

    Examples:
        >>> mean_interval([1.0, 2.0, 3.0]).format(3)
        '2.000 ± 2.484'

    """
    from scipy import stats

    values = [float(value) for value in values]
    if not values:
        raise ValueError("values must hold at least one number but is empty.")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"values must be finite but are {values}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) but is {confidence!r}.")
    count = len(values)
    mean = sum(values) / count
    if count == 1:
        return MeanInterval(mean, None, 1, confidence)
    variance = sum((value - mean) ** 2 for value in values) / (count - 1)
    quantile = float(stats.t.ppf((1.0 + confidence) / 2.0, count - 1))
    return MeanInterval(mean, quantile * math.sqrt(variance / count), count, confidence)


def paired_change(
    before: Sequence[float], after: Sequence[float], confidence: float = CONFIDENCE
) -> MeanInterval:
    """Mean per-seed change ``after - before`` and its paired confidence interval.

    Args:
        before: Score of each seed before (e.g. the starting backbone evaluated per seed).
        after: Score of the same seeds after, in the same order.
        confidence: Level of the interval.

    Raises:
        ValueError: If the two lists differ in length (or as ``mean_interval``).

    """
    if len(before) != len(after):
        raise ValueError(
            f"before and after must hold one score per seed each but have {len(before)} and "
            f"{len(after)} values."
        )
    return mean_interval([b - a for a, b in zip(before, after, strict=True)], confidence)
