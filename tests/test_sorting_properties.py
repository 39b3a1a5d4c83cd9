"""Property-based tests of the soft permutations of every backend and their gradients."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from neco_loss import soft_permutation
from neco_loss.sorting.networks import sorting_plan
from tests.strategies import (
    BACKENDS,
    NETWORKS,
    RELAXATIONS,
    SORTING_NETWORK_BACKENDS,
    given_score_cases,
    networks,
    relaxations,
    score_matrices,
    separated_rows,
    steepnesses,
    supported,
)


def n_layers(network: str, n: int) -> int:
    return sorting_plan(network, n, torch.device("cpu"), torch.float64).n_layers


@pytest.mark.parametrize("backend", BACKENDS)
@given_score_cases
def test_perm_is_stochastic_and_sorts_x(backend, x, steepness, network, relaxation):
    assume(supported(backend, network, x.shape[1]))
    sorted_x, perm = soft_permutation(x, network, steepness, relaxation, backend)
    assert perm.shape == (x.shape[0], x.shape[1], x.shape[1])
    assert sorted_x.shape == x.shape
    assert ((perm >= -1e-12) & (perm <= 1 + 1e-12)).all()
    ones = torch.ones(x.shape[:2], dtype=x.dtype)
    torch.testing.assert_close(perm.sum(dim=2), ones, rtol=0, atol=1e-9)
    if backend in SORTING_NETWORK_BACKENDS:
        torch.testing.assert_close(perm.sum(dim=1), ones, rtol=0, atol=1e-9)
    scale = x.abs().max().item() + 1e-300
    torch.testing.assert_close(
        (x.unsqueeze(1) @ perm).squeeze(1), sorted_x, rtol=0, atol=1e-9 * scale
    )


@pytest.mark.parametrize("backend", SORTING_NETWORK_BACKENDS)
@given_score_cases
def test_sorted_is_ascending_within_steepness_tolerance(backend, x, steepness, network, relaxation):
    assume(supported(backend, network, x.shape[1]))
    sorted_x, _ = soft_permutation(x, network, steepness, relaxation, backend)
    # Each relaxed comparator leaves at most ~1 / steepness (in value units) out of order
    # (Cauchy: (1 - alpha) * gap <= 1 / (pi * steepness)); errors add up over the layers.
    tolerance = n_layers(network, x.shape[1]) / steepness
    assert (sorted_x.diff(dim=1) >= -tolerance).all()


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    data=separated_rows(),
    steepness=st.floats(100.0, 1000.0),
    network=networks,
    relaxation=relaxations,
)
def test_hard_ranks_for_separated_values(backend, data, steepness, network, relaxation):
    x, _ = data
    assume(supported(backend, network, x.shape[1]))
    _, perm = soft_permutation(x, network, steepness, relaxation, backend)
    hard_ranks = torch.argsort(torch.argsort(x, dim=1), dim=1)
    assert torch.equal(perm.argmax(dim=2), hard_ranks)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    data=separated_rows(),
    steepness=st.floats(10.0, 1000.0),
    network=networks,
    relaxation=relaxations,
    seed=st.integers(0, 2**16),
)
def test_permuting_inputs_permutes_rows(backend, data, steepness, network, relaxation, seed):
    x, gap = data
    assume(supported(backend, network, x.shape[1]))
    shuffle = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))
    _, perm = soft_permutation(x, network, steepness, relaxation, backend)
    _, perm_shuffled = soft_permutation(x[:, shuffle], network, steepness, relaxation, backend)
    # Relaxed networks are not exactly equivariant: each comparator an element passes leaks
    # about 1 / (steepness * gap) of its mass, whatever the input order.
    tolerance = 2 * n_layers(network, x.shape[1]) / (steepness * gap)
    torch.testing.assert_close(perm_shuffled, perm[:, shuffle], rtol=0, atol=tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    x=score_matrices(),
    steepness=steepnesses,
    network=networks,
    relaxation=relaxations,
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_gradients_are_finite(backend, x, steepness, network, relaxation, dtype):
    assume(supported(backend, network, x.shape[1]))
    x = x.to(dtype).requires_grad_()
    sorted_x, perm = soft_permutation(x, network, steepness, relaxation, backend)
    weights = torch.linspace(-1, 1, perm.numel(), dtype=perm.dtype).view_as(perm)
    ((perm * weights).sum() + sorted_x.square().sum()).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_native_gradcheck(network, relaxation, n):
    x = torch.randn(
        3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)
    ).requires_grad_()

    def both(values):
        return soft_permutation(values, network, 3.0, relaxation, "native")

    assert torch.autograd.gradcheck(both, (x,), eps=1e-6, atol=1e-5)


def cross_entropy(q_teacher: torch.Tensor, q_student: torch.Tensor) -> torch.Tensor:
    return -(q_teacher * q_student.clamp_min(1e-300).log()).sum(dim=2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    x=score_matrices(max_n=12),
    steepness=st.floats(1.0, 100.0),
    network=networks,
    relaxation=relaxations,
    seed=st.integers(0, 2**16),
)
def test_cross_entropy_is_minimal_at_the_teacher(backend, x, steepness, network, relaxation, seed):
    assume(supported(backend, network, x.shape[1]))
    x = x / (x.abs().max() + 1e-12)  # unit scale, so that perturbations are comparable
    _, q_teacher = soft_permutation(x, network, steepness, relaxation, backend)
    student = x.clone().requires_grad_()
    _, q_student = soft_permutation(student, network, steepness, relaxation, backend)
    at_teacher = cross_entropy(q_teacher, q_student)
    (grad,) = torch.autograd.grad(at_teacher, student)
    # d CE / d Q_s = -Q_t / Q_s = -1 at Q_s = Q_t, and the entries of Q_s always add up to n.
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)
    noise = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    _, q_perturbed = soft_permutation(x + 0.1 * noise, network, steepness, relaxation, backend)
    assert cross_entropy(q_teacher, q_perturbed) >= at_teacher - 1e-9
