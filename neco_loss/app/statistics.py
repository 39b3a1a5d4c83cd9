"""Intervals for results over seeds that include the noise of training *and* of evaluation.

A score depends on the training seed (initialisation of the heads, crops, data order,
reference draws) and on the images it is scored on (each seed of an experiment draws its own
scored and memory/probe images). Two estimates:

- ``bootstrap_estimate``: a two-level bootstrap. Each resample draws the seeds with
  replacement and, within every drawn seed, its scored images with replacement (the same
  images for both backbones of a change: paired), and recomputes the mIoU from the images'
  pixel counts. The interval is the percentile interval of the mean over seeds; the p-value
  of "no change" is twice the smaller share of resamples on either side of 0; the smallest
  change the design could detect (two-sided 5%, power 80%) is ``(z_0.975 + z_0.8) * SE``.
  With few seeds the seed level is coarse (5 seeds have 126 distinct resamples); the
  Student-t interval over seeds (``seed_estimate``) is the check.
- ``seed_estimate`` / ``mean_interval`` / ``paired_change``: Student-t over seeds. With each
  seed scoring its own images, the spread over seeds already holds both noises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from neco_loss.evaluation.miou import miou_of_counts

CONFIDENCE = 0.95
POWER = 0.8  # of the smallest detectable change
RESAMPLES = 2000


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


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (or a mean paired change) with its interval.

    Attributes:
        mean: The mean over seeds of the per-seed values (changes: paired differences).
        low: Lower end of the interval (``None`` without one).
        high: Upper end.
        count: Number of seeds.
        p_value: Two-sided p-value of "no change" (changes only).
        detectable: The smallest change the design detects at 5% with 80% power (changes).
        method: How the interval was computed.
        confidence: Level of the interval.

    """

    mean: float
    low: float | None
    high: float | None
    count: int
    p_value: float | None = None
    detectable: float | None = None
    method: str = ""
    confidence: float = CONFIDENCE

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0 (False without one)."""
        if self.low is None or self.high is None:
            return False
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 4, signed: bool = False) -> str:
        """``"0.4123 [0.4010, 0.4230]"``; a change adds ``p`` and, including 0, the detectable."""
        sign = "+" if signed else ""
        text = f"{self.mean:{sign}.{digits}f}"
        if self.low is None or self.high is None:
            return text
        text += f" [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"
        if self.p_value is not None:
            text += f" p={self.p_value:.3g}"
            if not self.excludes_zero() and self.detectable is not None:
                text += f" (detectable: ±{self.detectable:.{digits}f})"
        return text


def _resampled_miou(counts: Tensor, image_draws: Tensor) -> Tensor:
    """``(R,)`` mIoU of ``counts (N, 3, C)`` summed over each resample's images ``(R, N)``."""
    resamples, images = image_draws.shape
    weights = torch.zeros(resamples, images, dtype=torch.float64)
    weights.scatter_add_(1, image_draws, torch.ones_like(weights))
    summed = weights @ counts.reshape(images, -1).double()
    return miou_of_counts(summed.view(resamples, *counts.shape[1:]))


def bootstrap_estimate(
    after: Sequence[Tensor],
    before: Sequence[Tensor] | None = None,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Mean mIoU over seeds, or mean paired change, with a two-level bootstrap interval.

    Args:
        after: Per seed, the scored images' pixel counts ``(N_s, 3, C)``
            (``evaluation.miou.image_counts``).
        before: For a change, the same images' counts of the other backbone, per seed.
        resamples: Bootstrap resamples.
        confidence: Level of the interval.
        seed: Seed of the resampling.

    Returns:
        The ``Estimate``; ``p_value`` and ``detectable`` for a change.

    Raises:
        ValueError: If there is no seed, or ``before`` does not pair image for image.

    """
    if not after:
        raise ValueError("after must hold the counts of at least one seed but is empty.")
    if before is not None and [c.shape for c in before] != [c.shape for c in after]:
        raise ValueError(
            "before must pair with after image for image but has shapes "
            f"{[tuple(c.shape) for c in before]} against {[tuple(c.shape) for c in after]}."
        )
    generator = torch.Generator().manual_seed(seed)
    values, points = _per_seed_resamples(after, before, resamples, generator)
    seeds = torch.randint(len(after), (resamples, len(after)), generator=generator)
    means = values.gather(1, seeds).mean(dim=1)
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype))
    method = f"two-level bootstrap ({resamples} resamples of seeds, then images)"
    mean = sum(points) / len(points)
    if before is None:
        return Estimate(
            mean, float(low), float(high), len(after), method=method, confidence=confidence
        )
    side = min(int((means <= 0).sum()), int((means >= 0).sum()))
    p_value = min(1.0, 2.0 * (side + 1) / (resamples + 1))
    detectable = _detectable(float(means.std()), None)
    return Estimate(
        mean, float(low), float(high), len(after), p_value, detectable, method, confidence
    )


def _per_seed_resamples(
    after: Sequence[Tensor],
    before: Sequence[Tensor] | None,
    resamples: int,
    generator: torch.Generator,
) -> tuple[Tensor, list[float]]:
    """``(R, S)`` every seed's mIoU (or change) over resampled images, and its full value."""
    points, per_seed = [], []
    for index, counts in enumerate(after):
        draws = torch.randint(len(counts), (resamples, len(counts)), generator=generator)
        value, point = _resampled_miou(counts, draws), miou_of_counts(counts.sum(0))
        if before is not None:  # the same resampled images for both backbones
            value = value - _resampled_miou(before[index], draws)
            point = point - miou_of_counts(before[index].sum(0))
        per_seed.append(value)
        points.append(float(point))
    return torch.stack(per_seed, dim=1), points


def _detectable(standard_error: float, degrees: int | None) -> float:
    """``(q_{0.975} + q_{0.8}) * SE``: normal quantiles, or Student-t with ``degrees``."""
    from scipy import stats

    if degrees is None:
        return float(stats.norm.ppf(0.975) + stats.norm.ppf(POWER)) * standard_error
    return float(stats.t.ppf(0.975, degrees) + stats.t.ppf(POWER, degrees)) * standard_error


def seed_estimate(values: Sequence[float], change: bool = False) -> Estimate:
    """The Student-t ``Estimate`` over seeds of ``values`` (per-seed changes with ``change``).

    A change adds the one-sample t-test's p-value and the smallest detectable change.
    """
    from scipy import stats

    interval = mean_interval(values)
    if interval.half_width is None:
        return Estimate(interval.mean, None, None, 1, method="one seed: no interval")
    method = f"Student-t over {interval.count} seeds"
    if not change:
        return Estimate(interval.mean, interval.low, interval.high, interval.count, method=method)
    standard_error = interval.half_width / float(stats.t.ppf(0.975, interval.count - 1))
    p_value = (
        1.0
        if standard_error == 0 and interval.mean == 0
        else float(stats.ttest_1samp(list(values), 0.0).pvalue)
    )
    return Estimate(
        interval.mean,
        interval.low,
        interval.high,
        interval.count,
        p_value,
        _detectable(standard_error, interval.count - 1),
        method,
    )
