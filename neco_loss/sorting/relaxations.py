"""Relaxed comparators: the swap probabilities of diffsort 0.2.0, with their derivatives.

A relaxed comparator of two wires ``a`` and ``b`` sends ``alpha * a + (1 - alpha) * b`` to the
minimum's wire and ``(1 - alpha) * a + alpha * b`` to the maximum's, with
``alpha = f(delta)``, ``delta = b - a``. The formulas and the order of their floating-point
operations follow ``diffsort.functional.execute_sort`` (Petersen et al., "Differentiable Sorting
Networks for Scalable Sorting and Ranking Supervision", ICML 2021; "Monotonic Differentiable
Sorting Networks", ICLR 2022), so that values agree to rounding.

Each relaxation provides ``alpha(delta)`` and ``d alpha / d delta`` in closed form: the native
backend's backward uses the derivative directly instead of an autograd graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PHI_EPSILON = 1e-10  # diffsort: (|a - b| + 1e-10) ** art_lambda in logistic_phi
OPTIMAL_EPSILON = 1e-10  # diffsort: 1 / 16 / (|x| + 1e-10) in s_best


@dataclass(frozen=True)
class Relaxation:
    """A swap probability and its derivative.

    Attributes:
        name: Registry name (diffsort's ``distribution`` argument).
        alpha: ``(delta, steepness, art_lambda) -> alpha``, elementwise, alpha in [0, 1].
        dalpha: ``(delta, steepness, art_lambda) -> d alpha / d delta``, elementwise.

    """

    name: str
    alpha: Callable[[Tensor, float, float], Tensor]
    dalpha: Callable[[Tensor, float, float], Tensor]


def _logistic(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    return torch.sigmoid(delta * steepness)


def _logistic_grad(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    alpha = torch.sigmoid(delta * steepness)
    return alpha * (1 - alpha) * steepness


def _logistic_phi(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    return torch.sigmoid(delta * steepness / (delta.abs() + PHI_EPSILON).pow(art_lambda))


def _logistic_phi_grad(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    scale = delta.abs() + PHI_EPSILON
    alpha = torch.sigmoid(delta * steepness / scale.pow(art_lambda))
    # d/dd [s d (|d| + eps)^-l] = s (|d| + eps)^(-l - 1) ((|d| + eps) - l |d|); autograd's
    # subgradient of |d| at 0 is 0, which this expression reproduces.
    inner = steepness * scale.pow(-art_lambda - 1) * (scale - art_lambda * delta.abs())
    return alpha * (1 - alpha) * inner


def _gaussian(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    sigma = 1 / steepness  # diffsort: NormalCDF(delta, 1 / steepness)
    return 0.5 + 0.5 * torch.erf(delta / sigma / math.sqrt(2))


def _gaussian_grad(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    sigma = 1 / steepness
    return 1 / sigma / math.sqrt(math.pi * 2) * torch.exp(-0.5 * (delta / sigma).pow(2))


def _reciprocal(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    v = steepness * delta
    return 0.5 * (v / (2 + v.abs()) + 1)


def _reciprocal_grad(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    v = steepness * delta
    return steepness / (2 + v.abs()).pow(2)


def _cauchy(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    v = steepness * delta
    return 1 / math.pi * torch.atan(v) + 0.5


def _cauchy_grad(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    v = steepness * delta
    return steepness / math.pi / (1 + v * v)


def _optimal(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    v = steepness * delta
    outside = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)
    return v.clamp(-0.25, 0.25) + 0.5 + outside * (0.25 - 1 / 16 / (v.abs() + OPTIMAL_EPSILON))


def _optimal_grad(delta: Tensor, steepness: float, art_lambda: float) -> Tensor:
    v = steepness * delta
    inside = (v.abs() < 0.25).to(v.dtype)
    outside = (v.abs() > 0.25).to(v.dtype)
    tail = 1 / 16 / (v.abs() + OPTIMAL_EPSILON).pow(2)
    # As autograd differentiates diffsort's s_best: clamp passes the gradient strictly inside
    # (-0.25, 0.25), the tail term strictly outside; exactly at |v| = 0.25 both give 0.
    return steepness * (inside + outside * tail)


RELAXATIONS: dict[str, Relaxation] = {
    r.name: r
    for r in (
        Relaxation("cauchy", _cauchy, _cauchy_grad),
        Relaxation("logistic", _logistic, _logistic_grad),
        Relaxation("logistic_phi", _logistic_phi, _logistic_phi_grad),
        Relaxation("gaussian", _gaussian, _gaussian_grad),
        Relaxation("reciprocal", _reciprocal, _reciprocal_grad),
        Relaxation("optimal", _optimal, _optimal_grad),
    )
}


def get_relaxation(name: str) -> Relaxation:
    """Look up a relaxation by its diffsort name.

    Args:
        name: One of ``cauchy`` (diffsort 0.2.0's default), ``logistic``, ``logistic_phi``,
            ``gaussian``, ``reciprocal``, ``optimal``.

    Returns:
        The relaxation.

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.

    """
    if name not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {list(RELAXATIONS)} but is {name!r}.")
    return RELAXATIONS[name]
