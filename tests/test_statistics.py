"""Means and Student-t intervals over seeds, against known numbers and scipy."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from neco_loss.app.statistics import MeanInterval, mean_interval, paired_change


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
