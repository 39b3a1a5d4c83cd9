"""Intervals over seeds (Student-t) and over seeds and images (bootstrap), on known numbers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from neco_loss.app.statistics import (
    MeanInterval,
    bootstrap_estimate,
    mean_interval,
    paired_change,
    seed_estimate,
)
from neco_loss.evaluation.miou import ConfusionMatrix, image_counts, miou_of_counts


def test_known_numbers():
    # mean 2, s = 1, t(0.975, 2) = 4.302653: half-width 4.302653 / sqrt(3) = 2.484138.
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.count == 3
    assert interval.half_width == pytest.approx(2.484138, abs=1e-6)
    # five values: mean 0.6, s = 0.158114, t(0.975, 4) = 2.776445: 0.196324.
    interval = mean_interval([0.5, 0.7, 0.6, 0.8, 0.4])
    assert interval.mean == pytest.approx(0.6)
    assert interval.half_width == pytest.approx(0.196324, abs=1e-6)
    assert interval.format(3) == "0.600 ± 0.196"
    assert interval.format(3, signed=True) == "+0.600 ± 0.196"
    assert mean_interval([-0.25, -0.75]).format(2, signed=True).startswith("-0.50 ± ")
    assert interval.low == pytest.approx(0.403676, abs=1e-6)
    # 90% interval: t(0.95, 4) = 2.131847.
    assert mean_interval([0.5, 0.7, 0.6, 0.8, 0.4], 0.9).half_width == pytest.approx(
        2.131847 * 0.158114 / math.sqrt(5), abs=1e-6
    )


def test_single_value_has_no_interval():
    interval = mean_interval([0.25])
    assert interval == MeanInterval(0.25, None, 1)
    assert interval.format() == "0.2500" and not interval.excludes_zero()
    assert interval.format(signed=True) == "+0.2500"
    assert interval.low is None and interval.high is None


def test_paired_change_is_the_interval_of_differences():
    before, after = [0.30, 0.32, 0.31], [0.35, 0.36, 0.37]
    change = paired_change(before, after)
    expected = mean_interval([a - b for a, b in zip(after, before, strict=True)])
    assert change == expected and change.mean == pytest.approx(0.05)
    assert change.excludes_zero()
    assert not paired_change([0.3, 0.4, 0.3], [0.31, 0.35, 0.33]).excludes_zero()


@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=2, max_size=12),
    st.floats(0.5, 0.99),
)
def test_agrees_with_scipy(values, confidence):
    interval = mean_interval(values, confidence)
    if stats.sem(values) > 0:
        low, high = stats.t.interval(
            confidence, len(values) - 1, loc=sum(values) / len(values), scale=stats.sem(values)
        )
        assert interval.low == pytest.approx(low, rel=1e-9, abs=1e-9)
        assert interval.high == pytest.approx(high, rel=1e-9, abs=1e-9)
    else:
        assert interval.half_width == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("values", "confidence", "message"),
    [
        ([], 0.95, "at least one number"),
        ([1.0, float("nan")], 0.95, "must be finite"),
        ([1.0, 2.0], 1.0, "confidence must be in"),
    ],
)
def test_bad_input(values, confidence, message):
    with pytest.raises(ValueError, match=message):
        mean_interval(values, confidence)


def test_paired_change_needs_matching_lengths():
    with pytest.raises(ValueError, match="one score per seed each but have 2 and 3"):
        paired_change([0.1, 0.2], [0.1, 0.2, 0.3])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 5))
def test_image_counts_sum_to_the_confusion_matrix_miou(seed, images, classes):
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randint(classes, (images, 5, 7), generator=generator)
    target = torch.randint(classes + 1, (images, 5, 7), generator=generator)  # + ignored label
    matrix = ConfusionMatrix(classes, ignore_index=classes)
    matrix.update(prediction, target)
    counts = image_counts(prediction, target, classes, ignore_index=classes)
    assert counts.shape == (images, 3, classes)
    expected = matrix.miou()
    got = float(miou_of_counts(counts.sum(0)))
    assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected)


def _uniform(right, labelled, images=8, classes=2):
    """Counts of ``images`` identical images: ``right`` of ``labelled`` pixels per class right."""
    one = torch.tensor([[right] * classes, [labelled] * classes, [labelled] * classes])
    return one.expand(images, 3, classes).clone()  # IoU = right / (2 * labelled - right)


def test_bootstrap_on_known_numbers():
    # Identical images: no image noise. Seeds with mIoU 0.5 and 1/3: the seed-level resamples
    # give means 0.5, 5/12 and 1/3, so the 95% interval is [1/3, 0.5] around the mean 5/12.
    seeds = [_uniform(2, 3), _uniform(1, 2)]  # IoU 2 / (6 - 2) = 0.5 and 1 / (4 - 1) = 1/3
    estimate = bootstrap_estimate(seeds)
    assert estimate.mean == pytest.approx(5 / 12) and estimate.count == 2
    assert estimate.low == pytest.approx(1 / 3) and estimate.high == pytest.approx(0.5)
    assert estimate.p_value is None and "bootstrap" in estimate.method
    # A change of the same images by themselves is exactly 0, never significant.
    change = bootstrap_estimate(seeds, seeds)
    assert (change.mean, change.low, change.high, change.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert change.detectable == 0.0 and not change.excludes_zero()


def test_bootstrap_change_pairs_the_images_and_finds_a_consistent_gain():
    generator = torch.Generator().manual_seed(0)
    before, after = [], []
    for _ in range(3):  # seeds; images vary a lot, the gain on every image is small
        labelled = torch.randint(50, 150, (32, 1, 4), generator=generator)
        right = (labelled * torch.rand(32, 1, 4, generator=generator) * 0.8).long()
        before.append(torch.cat([right, labelled, labelled], dim=1))
        after.append(torch.cat([right + 5, labelled, labelled], dim=1))
    change = bootstrap_estimate(after, before)
    assert change.excludes_zero() and change.low > 0 and change.p_value < 0.01
    # Unpaired, the image noise of a row is much wider than the paired change's interval.
    row = bootstrap_estimate(after)
    assert row.high - row.low > 3 * (change.high - change.low)
    assert "detectable" not in change.format()  # the interval excludes 0
    assert "p=" in change.format(signed=True)


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="at least one seed"):
        bootstrap_estimate([])
    with pytest.raises(ValueError, match="pair with after image for image"):
        bootstrap_estimate([_uniform(1, 2, images=4)], [_uniform(1, 2, images=5)])


def test_seed_estimate_states_what_a_null_result_could_detect():
    estimate = seed_estimate([0.01, -0.01, 0.02, -0.02, 0.0], change=True)
    assert not estimate.excludes_zero() and estimate.p_value == pytest.approx(1.0)
    # (t_0.975,4 + t_0.8,4) * s / sqrt(5), s = 0.01581
    assert estimate.detectable == pytest.approx((2.7764 + 0.9410) * 0.015811 / 5**0.5, rel=1e-3)
    assert "(detectable: ±0.0263)" in estimate.format(signed=True)
