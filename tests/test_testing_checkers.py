"""``neco_loss.testing``: each property catches a sorter broken for it, with a readable minimal
counterexample; diffsort's bitonic layout at n = 22 is caught; bad sorters get clear errors."""

import re

import pytest
import torch

from neco_loss import soft_permutation
from neco_loss.testing import (
    PROPERTIES,
    SorterError,
    check_soft_sort,
    run_properties,
)

N = (1, 12)  # small sizes keep these searches fast


def good(x, steepness):
    return soft_permutation(x, "odd_even", steepness, backend="native-python")


def status(report, name):
    return next(result for result in report.results if result.name == name)


def negative_entries(x, steepness):
    sorted_x, perm = good(x, steepness)
    return sorted_x, perm * 1.5 - 0.25


def rows_not_summing_to_one(x, steepness):
    sorted_x, perm = good(x, steepness)
    return sorted_x * 0.9, perm * 0.9


def sorted_x_off(x, steepness):
    sorted_x, perm = good(x, steepness)
    return sorted_x + 0.1, perm


def descending(x, steepness):
    sorted_x, perm = good(x, steepness)
    return sorted_x.flip(-1), perm.flip(-1)


def identity(x):
    eye = torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    return x * 1, eye + 0 * x.unsqueeze(-1)


def position_biased(x, steepness):
    _, perm = good(x, steepness)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    perm = 0.5 * perm + 0.5 * eye
    return (x.unsqueeze(1) @ perm).squeeze(1), perm


def infinite_gradient_at_zero(x, steepness):
    return good(x + 0 * x.abs().sqrt(), steepness)


class WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def wrong_backward(x, steepness):
    return good(WrongBackward.apply(x), steepness)


def first_order_only(x, steepness):
    return soft_permutation(x, "odd_even", steepness, backend="native-python")


def half_as_steep(x, steepness):
    return good(x, steepness / 2)


def mass_follows_values(x, steepness):
    sorted_x, perm = good(x, steepness)
    return sorted_x, perm * (1 + 0.1 * torch.tanh(x)).unsqueeze(-1)


BROKEN = {
    "entries": (negative_entries, r"perm\[\d+, \d+, \d+\] = -?[\d.e-]+ is not in \[0, 1\]"),
    "doubly_stochastic": (rows_not_summing_to_one, r"sums to 0\.9\d*, not 1 \(tolerance"),
    "sorted_matches_perm": (sorted_x_off, r"sorted_x\[\d+, \d+\] = .* but \(x @ perm\)"),
    "ascending": (descending, r"is below value \d+ .* by more than the tolerance"),
    "hard_ranks": (identity, r"is most likely at rank \d+ .* but its rank is \d+"),
    "equivariance": (position_biased, r"shuffled by \[.*\]: the shuffled input's element"),
    "finite_gradients": (infinite_gradient_at_zero, r"the gradient of element \d+ of row \d+ is"),
    "gradcheck": (wrong_backward, r"\(float64\): gradcheck failed: Jacobian mismatch"),
    "gradgradcheck": (first_order_only, r"gradgradcheck failed: .*first-order backward only"),
    "parity": (half_as_steep, r"but the reference good gives"),
    "cross_entropy": (mass_follows_values, r"at Q_s = Q_t the gradient of CE\(Q_t, Q_s\)"),
}


def test_every_property_has_a_broken_sorter():
    assert set(BROKEN) == set(PROPERTIES)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_sorter_broken_for_a_property_is_caught_with_a_counterexample(name):
    sorter, message = BROKEN[name]
    report = run_properties(sorter, [name], max_examples=40, n=N, reference=good)
    result = status(report, name)
    assert result.status == "failed", report.as_text()
    assert re.search(message, result.detail), result.detail
    assert result.detail.startswith("n = "), result.detail  # the input comes first
    assert re.match(r"n = \d+, input \[\[", result.detail)


def test_counterexamples_are_minimal():
    """Hypothesis shrinks: the identity 'sorter' fails hard ranks first at n = 2."""
    report = run_properties(identity, ["hard_ranks"], max_examples=40, n=N)
    assert status(report, "hard_ranks").detail.startswith("n = 2, input [[")


@pytest.mark.parametrize("name", sorted(set(BROKEN) - {"gradgradcheck", "parity"}))
def test_a_correct_sorter_passes(name):
    report = run_properties(good, [name], max_examples=25, n=N)
    assert status(report, name).status == "passed", report.as_text()


def test_one_line_check_raises_with_every_failure():
    check_soft_sort(good, ["entries", "ascending", "hard_ranks"], max_examples=10, n=N)
    with pytest.raises(AssertionError, match=r"(?s)soft sort properties of descending.*ascending"):
        check_soft_sort(descending, "all", max_examples=10, n=N)


def test_diffsort_bitonic_at_22_fails_ascending_and_hard_ranks():
    diffsort = pytest.importorskip("diffsort")

    def diffsort_bitonic(x, steepness):
        return diffsort.DiffSortNet("bitonic", x.shape[1], steepness=steepness)(x)

    report = run_properties(
        diffsort_bitonic, ["ascending", "hard_ranks"], max_examples=30, n=(22, 22)
    )
    for name in ("ascending", "hard_ranks"):
        result = status(report, name)
        assert result.status == "failed", report.as_text()
        assert result.detail.startswith("n = 22, input [[")


def test_not_applicable_properties_say_why():
    report = run_properties(lambda x: good(x, 100.0)[1], ["sorted_matches_perm", "parity"])
    assert [r.status for r in report.results] == ["not applicable"] * 2
    assert "perm only" in report.results[0].detail
    assert "no reference" in report.results[1].detail


class TestBadSorters:
    def test_not_callable(self):
        with pytest.raises(SorterError, match="must be a callable x -> \\(sorted_x, perm\\)"):
            run_properties("soft_permutation")

    def test_wrong_output_shape(self):
        with pytest.raises(SorterError, match=r"perm of shape \(2, 3, 3\).*shape \(2, 3\)"):
            run_properties(lambda x: x)

    def test_wrong_output_kind(self):
        with pytest.raises(SorterError, match="must return .* not str"):
            run_properties(lambda x: "sorted")

    def test_sorter_that_raises(self):
        def raises(x):
            raise RuntimeError("not implemented")

        with pytest.raises(
            SorterError, match="raised RuntimeError: not implemented on a \\(2, 3\\)"
        ):
            run_properties(raises)

    def test_sorter_that_raises_on_some_inputs_fails_with_that_input(self):
        def refuses_large(x, steepness):
            if x.shape[1] > 4:
                raise ValueError(f"n = {x.shape[1]} is too large")
            return good(x, steepness)

        report = run_properties(refuses_large, ["entries"], max_examples=30, n=(1, 8))
        detail = status(report, "entries").detail
        assert (
            detail.startswith("n = 5, input") and "raised ValueError: n = 5 is too large" in detail
        )

    def test_unknown_property(self):
        with pytest.raises(ValueError, match="properties must be 'all' or names from"):
            run_properties(good, ["sortedness"])
