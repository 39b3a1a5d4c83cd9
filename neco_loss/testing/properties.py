"""One check per property of a soft sort, each drawing its inputs from hypothesis.

Every check raises ``PropertyViolationError`` with the input and what was wrong, in words
("n = 22, input [...]: row 3 of perm sums to 0.41"); hypothesis shrinks the input first, so
the message describes a minimal counterexample. Tolerances follow from the relaxation: a
relaxed comparator leaves about ``1 / steepness`` (in value units) out of order, and a network
on ``n`` inputs has fewer than ``2 n`` layers (bitonic and odd-even).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

from neco_loss.testing.sorter import SorterUnderTest, describe
from neco_loss.testing.strategies import score_matrices, separated_rows, sizes, steepnesses


class PropertyViolationError(AssertionError):
    """A property does not hold; the message names the input and what was seen."""


@dataclass(frozen=True)
class CheckConfig:
    """What the checks draw and compare against.

    Attributes:
        min_n: Smallest row length.
        max_n: Largest row length.
        steepness_range: Steepnesses drawn for sorters that take one.
        dtypes: Input dtypes.
        reference: A sorter the ``parity`` property compares with (same call convention).
        parity_atol: Largest allowed difference of the permutations for ``parity``.
        gradcheck_max_n: Largest ``n`` for ``gradcheck``/``gradgradcheck`` (finite differences
            cost ``n`` sorts per row).

    """

    min_n: int = 1
    max_n: int = 130
    steepness_range: tuple[float, float] = (1.0, 1000.0)
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)
    reference: SorterUnderTest | None = None
    parity_atol: float = 1e-6
    gradcheck_max_n: int = 8


Check = Callable[[SorterUnderTest, st.DataObject, CheckConfig], None]


@dataclass(frozen=True)
class Property:
    """A named property: its check and when it applies."""

    name: str
    summary: str
    check: Check
    needs_sorted: bool = False
    needs_reference: bool = False
    optional: bool = False  # not part of "all": asked for by name

    def not_applicable(self, sorter: SorterUnderTest, config: CheckConfig) -> str | None:
        """Why the property does not apply to ``sorter``, or ``None``."""
        if self.needs_sorted and not sorter.returns_sorted:
            return "the sorter returns perm only"
        if self.needs_reference and config.reference is None:
            return "no reference sorter given"
        return None


def _tolerance(dtype: torch.dtype, float64: float, float32: float) -> float:
    return float64 if dtype == torch.float64 else float32


def _draw_scores(data: st.DataObject, config: CheckConfig, max_rows: int = 4) -> Tensor:
    return data.draw(score_matrices(config.min_n, config.max_n, max_rows, config.dtypes), label="x")


def _draw_steepness(sorter: SorterUnderTest, data: st.DataObject, low: float, high: float) -> float:
    if not sorter.takes_steepness:
        return sorter.fixed_steepness
    return data.draw(steepnesses(low, high), label="steepness")


def _where(sorter: SorterUnderTest, x: Tensor, steepness: float) -> str:
    at = f" at steepness {steepness:.4g}" if sorter.takes_steepness else ""
    return f"n = {x.shape[1]}, input {describe(x)}{at}"


def _first(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_entries(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """Every entry of ``perm`` is a probability, in ``[0, 1]``."""
    x = _draw_scores(data, config)
    steepness = _draw_steepness(sorter, data, *config.steepness_range)
    perm = sorter(x, steepness).perm
    slack = _tolerance(perm.dtype, 1e-9, 1e-5)
    outside = ~((perm >= -slack) & (perm <= 1 + slack))
    if outside.any():
        r, i, j = _first(outside)
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: perm[{r}, {i}, {j}] = {perm[r, i, j].item():.6g} "
            "is not in [0, 1]"
        )


def check_doubly_stochastic(
    sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig
) -> None:
    """Each element's ranks sum to 1, and each rank's elements sum to 1."""
    x = _draw_scores(data, config)
    steepness = _draw_steepness(sorter, data, *config.steepness_range)
    perm = sorter(x, steepness).perm
    slack = _tolerance(perm.dtype, 1e-9, 1e-4)
    for dim, what in ((2, "element {i}'s probabilities over ranks"), (1, "rank {i}'s column")):
        sums = perm.sum(dim=dim)
        wrong = (sums - 1).abs() > slack
        if wrong.any():
            r, i = _first(wrong)
            raise PropertyViolationError(
                f"{_where(sorter, x, steepness)}: in row {r} of the input, "
                f"{what.format(i=i)} sums to {sums[r, i].item():.12g}, not 1 (tolerance "
                f"{slack:.0e})"
            )


def check_sorted_matches_perm(
    sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig
) -> None:
    """``sorted_x == x @ perm`` (the soft sorted values are the permutation applied to x)."""
    x = _draw_scores(data, config)
    steepness = _draw_steepness(sorter, data, *config.steepness_range)
    output = sorter(x, steepness)
    assert output.sorted_x is not None  # the property applies to sorters that return it
    applied = (x.unsqueeze(1).to(output.perm.dtype) @ output.perm).squeeze(1)
    scale = x.abs().max().item() + 1e-300
    difference = (applied - output.sorted_x).abs()
    if (difference > _tolerance(x.dtype, 1e-9, 1e-5) * scale).any():
        r, j = _first(difference == difference.max())
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: sorted_x[{r}, {j}] = "
            f"{output.sorted_x[r, j].item():.6g} but (x @ perm)[{r}, {j}] = "
            f"{applied[r, j].item():.6g}"
        )


def _soft_sorted(output_sorted: Tensor | None, x: Tensor, perm: Tensor) -> Tensor:
    if output_sorted is not None:
        return output_sorted
    return (x.unsqueeze(1).to(perm.dtype) @ perm).squeeze(1)


def check_ascending(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """The soft sorted values ascend, up to ``2 n / steepness`` (fewer than 2n layers).

    Inputs are score matrices (ties, magnitudes) or rows of distinct values the network
    resolves, where a comparator network that mis-sorts shows drops far above the tolerance.
    """
    if data.draw(st.booleans(), label="separated values"):
        x, _, steepness = _separated_input(sorter, data, config)
    else:
        x = _draw_scores(data, config)
        steepness = _draw_steepness(sorter, data, *config.steepness_range)
    output = sorter(x, steepness)
    values = _soft_sorted(output.sorted_x, x, output.perm)
    n = x.shape[1]
    tolerance = 2 * n / steepness + _tolerance(x.dtype, 1e-9, 1e-5) * x.abs().max().item()
    drops = -values.diff(dim=1)
    if (drops > tolerance).any():
        r, j = _first(drops == drops.max())
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: sorted value {j + 1} of row {r} "
            f"({values[r, j + 1].item():.6g}) is below value {j} ({values[r, j].item():.6g}) "
            f"by more than the tolerance {tolerance:.3g}"
        )


def _separated_input(
    sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig
) -> tuple[Tensor, float, float]:
    """Rows of distinct values whose gaps the network resolves: ``steepness * gap >= 10 n``."""
    steepness = _draw_steepness(sorter, data, 100.0, max(100.0, config.steepness_range[1]))
    x, gap = data.draw(separated_rows(config.min_n, config.max_n), label="x")
    resolved = max(gap, 10 * x.shape[1] / steepness)
    return x / gap * resolved, resolved, steepness


def check_hard_ranks(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """Values ``10 n / steepness`` apart get their hard rank as their most likely rank."""
    x, _, steepness = _separated_input(sorter, data, config)
    perm = sorter(x, steepness).perm
    expected = x.argsort(dim=1).argsort(dim=1)
    likely = perm.argmax(dim=2)
    wrong = likely != expected
    if wrong.any():
        r, i = _first(wrong)
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: element {i} of row {r} (value "
            f"{x[r, i].item():.6g}) is most likely at rank {int(likely[r, i])} "
            f"(probability {perm[r, i].max().item():.3g}) but its rank is {int(expected[r, i])}"
        )


def check_equivariance(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """Shuffling the input shuffles perm's element rows the same way (up to the relaxation)."""
    x, gap, steepness = _separated_input(sorter, data, config)
    seed = data.draw(st.integers(0, 2**16), label="shuffle seed")
    shuffle = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))
    perm = sorter(x, steepness).perm
    shuffled = sorter(x[:, shuffle], steepness).perm
    # Each comparator an element passes leaks about 1 / (steepness * gap) of its mass.
    tolerance = 2 * 2 * x.shape[1] / (steepness * gap)
    difference = (shuffled - perm[:, shuffle]).abs()
    if (difference > tolerance).any():
        r, i, j = _first(difference == difference.max())
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}, shuffled by {shuffle.tolist()[:12]}: the shuffled "
            f"input's element {i} has probability {shuffled[r, i, j].item():.4g} at rank {j}, "
            f"but the same element unshuffled has {perm[r, shuffle[i], j].item():.4g}"
        )


def _weighted_loss(output_sorted: Tensor | None, perm: Tensor) -> Tensor:
    weights = torch.linspace(-1, 1, perm.numel(), dtype=perm.dtype).view_as(perm)
    loss = (perm * weights).sum()
    return loss if output_sorted is None else loss + output_sorted.square().sum()


def check_finite_gradients(
    sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig
) -> None:
    """Gradients are finite, ties and constant rows included."""
    x = _draw_scores(data, config).requires_grad_()
    steepness = _draw_steepness(sorter, data, *config.steepness_range)
    output = sorter(x, steepness)
    if not output.perm.requires_grad:
        raise PropertyViolationError(f"{_where(sorter, x, steepness)}: perm carries no gradient")
    (grad,) = torch.autograd.grad(_weighted_loss(output.sorted_x, output.perm), x)
    if not torch.isfinite(grad).all():
        r, i = _first(~torch.isfinite(grad))
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: the gradient of element {i} of row {r} is "
            f"{grad[r, i].item()}"
        )


def _gradcheck(
    sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig, second_order: bool
) -> None:
    n = data.draw(sizes(config.min_n, max(config.min_n, config.gradcheck_max_n)), label="n")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    steepness = _draw_steepness(sorter, data, 1.0, 10.0)
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_()

    def outputs(values: Tensor) -> tuple[Tensor, ...]:
        output = sorter(values, steepness)
        return (output.perm,) if output.sorted_x is None else (output.sorted_x, output.perm)

    check = torch.autograd.gradgradcheck if second_order else torch.autograd.gradcheck
    try:
        check(outputs, (x,), eps=1e-6, atol=1e-5)
    except (GradcheckError, RuntimeError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()][:3]
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)} (float64): {check.__name__} failed: "
            + " ".join(lines)[:400]
        ) from error


def check_gradcheck(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """Backward agrees with finite differences (``torch.autograd.gradcheck``, float64)."""
    _gradcheck(sorter, data, config, second_order=False)


def check_gradgradcheck(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """Second derivatives agree with finite differences (``gradgradcheck``, float64)."""
    _gradcheck(sorter, data, config, second_order=True)


def check_parity(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """``perm`` equals the reference sorter's within ``parity_atol``."""
    assert config.reference is not None  # the property applies only with one
    x = _draw_scores(data, config)
    steepness = _draw_steepness(sorter, data, *config.steepness_range)
    mine = sorter(x, steepness).perm
    theirs = config.reference(x, config.reference.steepness_for(steepness)).perm
    difference = (mine - theirs.to(mine.dtype)).abs()
    if (difference > config.parity_atol).any():
        r, i, j = _first(difference == difference.max())
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: perm[{r}, {i}, {j}] = {mine[r, i, j].item():.6g} "
            f"but the reference {config.reference.name} gives {theirs[r, i, j].item():.6g}"
        )


def check_cross_entropy(sorter: SorterUnderTest, data: st.DataObject, config: CheckConfig) -> None:
    """``CE(Q_t, Q_s)`` has zero gradient at ``Q_s = Q_t`` and is not lower nearby."""
    x = data.draw(score_matrices(config.min_n, min(config.max_n, 24), 4, (torch.float64,)))
    x = x / (x.abs().max() + 1e-12)  # unit scale, so that perturbations are comparable
    steepness = _draw_steepness(sorter, data, 1.0, 100.0)
    seed = data.draw(st.integers(0, 2**16), label="noise seed")

    def cross_entropy(q_teacher: Tensor, q_student: Tensor) -> Tensor:
        return -(q_teacher * q_student.clamp_min(1e-300).log()).sum(dim=2).mean()

    q_teacher = sorter(x, steepness).perm.detach()
    student = x.clone().requires_grad_()
    at_teacher = cross_entropy(q_teacher, sorter(student, steepness).perm)
    (grad,) = torch.autograd.grad(at_teacher, student)
    if grad.abs().max() > 1e-6:
        r, i = _first(grad.abs() == grad.abs().max())
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: at Q_s = Q_t the gradient of CE(Q_t, Q_s) for "
            f"element {i} of row {r} is {grad[r, i].item():.4g}, not 0"
        )
    noise = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    perturbed = cross_entropy(q_teacher, sorter(x + 0.1 * noise, steepness).perm.detach())
    if perturbed < at_teacher - 1e-9:
        raise PropertyViolationError(
            f"{_where(sorter, x, steepness)}: CE(Q_t, Q_s) is {perturbed.item():.6g} for a "
            f"perturbed input, below its value {at_teacher.item():.6g} at Q_s = Q_t"
        )


PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        Property("entries", "entries of perm in [0, 1]", check_entries),
        Property("doubly_stochastic", "rows and columns of perm sum to 1", check_doubly_stochastic),
        Property(
            "sorted_matches_perm",
            "sorted_x == x @ perm",
            check_sorted_matches_perm,
            needs_sorted=True,
        ),
        Property("ascending", "soft sorted values ascend within 2n / steepness", check_ascending),
        Property("hard_ranks", "well separated values get their hard ranks", check_hard_ranks),
        Property("equivariance", "shuffled input, shuffled perm rows", check_equivariance),
        Property(
            "finite_gradients", "finite gradients (ties, constant rows)", check_finite_gradients
        ),
        Property("gradcheck", "torch.autograd.gradcheck (float64)", check_gradcheck),
        Property(
            "gradgradcheck",
            "torch.autograd.gradgradcheck (float64); optional: first-order sorters fail it",
            check_gradgradcheck,
            optional=True,
        ),
        Property(
            "parity",
            "perm equals the reference sorter's",
            check_parity,
            needs_reference=True,
        ),
        Property(
            "cross_entropy",
            "CE(Q_t, Q_s) minimal with zero gradient at Q_s = Q_t",
            check_cross_entropy,
        ),
    )
}
