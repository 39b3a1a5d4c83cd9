"""Swap probabilities: diffsort's formulas, closed-form derivatives equal to autograd's."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neco_loss.sorting.relaxations import RELAXATIONS, get_relaxation

NAMES = list(RELAXATIONS)


def special_points(steepness: float) -> torch.Tensor:
    """Zero, the kinks of ``optimal`` (|v| = 0.25) and a spread of magnitudes."""
    kinks = torch.tensor([0.25, -0.25, 0.2500001, -0.2500001], dtype=torch.float64) / steepness
    spread = torch.tensor([0.0, 1e-12, -1e-12, 1e-4, -3e-3, 0.7, -2.0, 50.0], dtype=torch.float64)
    return torch.cat((kinks, spread))


@pytest.mark.parametrize("name", NAMES)
@given(steepness=st.floats(1.0, 1000.0), art_lambda=st.floats(0.05, 0.5))
def test_closed_form_derivative_equals_autograd(name: str, steepness: float, art_lambda: float):
    relaxation = get_relaxation(name)
    delta = special_points(steepness).requires_grad_()
    (autograd,) = torch.autograd.grad(relaxation.alpha(delta, steepness, art_lambda).sum(), delta)
    closed = relaxation.dalpha(delta.detach(), steepness, art_lambda)
    torch.testing.assert_close(closed, autograd, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@given(
    delta=st.floats(-1e6, 1e6, allow_subnormal=False),
    steepness=st.floats(1.0, 1000.0),
)
def test_probability_is_a_symmetric_cdf(name: str, delta: float, steepness: float):
    relaxation = get_relaxation(name)
    d = torch.tensor([delta, -delta, 0.0], dtype=torch.float64)
    alpha = relaxation.alpha(d, steepness, 0.25)
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert alpha[2] == 0.5
    torch.testing.assert_close(alpha[0] + alpha[1], torch.tensor(1.0, dtype=torch.float64))
    assert (relaxation.dalpha(d, steepness, 0.25) >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_probability_increases_with_the_gap(name: str):
    relaxation = get_relaxation(name)
    d = torch.linspace(-3, 3, 601, dtype=torch.float64)
    alpha = relaxation.alpha(d, 10.0, 0.25)
    assert (alpha.diff() >= 0).all()
    assert alpha[-1] > 0.9 and alpha[0] < 0.1


def test_unknown_relaxation_lists_valid_names():
    with pytest.raises(ValueError, match=r"relaxation must be one of \['cauchy'.*'sigmoid'"):
        get_relaxation("sigmoid")
