"""Run the properties on a sorter: a report per property, or one assertion for a test.

>>> import torch
>>> from neco_loss import soft_permutation
>>> def my_sorter(x, steepness):
...     return soft_permutation(x, "odd_even", steepness, backend="native-python")
>>> report = check_soft_sort(my_sorter, ["entries", "ascending"], max_examples=5, n=(1, 6))
>>> [result.status for result in report.results]
['passed', 'passed']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from neco_loss.testing.properties import PROPERTIES, Check, CheckConfig, PropertyViolationError
from neco_loss.testing.sorter import Sorter, SorterCallError, SorterUnderTest


@dataclass(frozen=True)
class PropertyResult:
    """One property's outcome.

    Attributes:
        name: The property (``PROPERTIES``).
        status: ``"passed"``, ``"failed"`` or ``"not applicable"``.
        detail: The minimal counterexample for a failure, why for "not applicable", else "".

    """

    name: str
    status: str
    detail: str = ""


@dataclass
class SorterReport:
    """Every checked property of one sorter."""

    sorter: str
    results: list[PropertyResult] = field(default_factory=list)

    @property
    def failures(self) -> list[PropertyResult]:
        """The failed properties."""
        return [result for result in self.results if result.status == "failed"]

    def as_text(self) -> str:
        """A table: property, status and counterexample, one line each."""
        width = max(len(result.name) for result in self.results)
        lines = [f"soft sort properties of {self.sorter}:"]
        for result in self.results:
            detail = f"  {result.detail}" if result.detail else ""
            lines.append(f"  {result.name:<{width}}  {result.status.upper():<14}{detail}")
        return "\n".join(lines)


def resolve_properties(properties: str | Sequence[str]) -> list[str]:
    """Property names from ``"all"``, one name, or a list (which may contain ``"all"``).

    ``"all"`` is every property but the optional ones (``gradgradcheck``), which are asked
    for by name: ``["all", "gradgradcheck"]``.

    Raises:
        ValueError: For an unknown name (the message lists the valid ones).

    """
    asked = [properties] if isinstance(properties, str) else list(properties)
    names: list[str] = []
    for name in asked:
        expanded = (
            [p.name for p in PROPERTIES.values() if not p.optional] if name == "all" else [name]
        )
        names += [n for n in expanded if n not in names]
    unknown = [name for name in names if name not in PROPERTIES]
    if unknown or not names:
        raise ValueError(
            f"properties must be 'all' or names from {list(PROPERTIES)} but got {properties!r}."
        )
    return names


def run_properties(
    sorter: Sorter,
    properties: str | Sequence[str] = "all",
    *,
    max_examples: int = 100,
    n: tuple[int, int] = (1, 130),
    steepness: float = 100.0,
    steepness_range: tuple[float, float] = (1.0, 1000.0),
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    reference: Sorter | None = None,
    parity_atol: float = 1e-6,
    random_seed: int = 0,
    name: str | None = None,
) -> SorterReport:
    """Check ``sorter`` against each property with hypothesis; never raises on a failure.

    Args:
        sorter: ``x -> (sorted_x, perm)`` or ``x -> perm`` (optionally with a ``steepness``
            keyword, then drawn from ``steepness_range``).
        properties: ``"all"`` (every property but the optional ``gradgradcheck``), names from
            ``neco_loss.testing.PROPERTIES``, or a list of both.
        max_examples: Hypothesis examples per property.
        n: Smallest and largest row length.
        steepness: The steepness a sorter without a ``steepness`` keyword runs at (tolerances).
        steepness_range: Steepnesses drawn for sorters that take one.
        dtypes: Input dtypes (float64, float32).
        reference: Sorter for the ``parity`` property.
        parity_atol: Tolerance of ``parity``.
        random_seed: Seed of hypothesis' search (a report is reproducible).
        name: The sorter's name in the report.

    Returns:
        A ``SorterReport``; failures carry the minimal counterexample hypothesis found.

    Raises:
        SorterError: If ``sorter`` (or ``reference``) is not a usable soft sorter.
        ValueError: For unknown properties or bad ranges.

    """
    names = resolve_properties(properties)
    _check_ranges(max_examples, n, steepness_range)
    under_test = SorterUnderTest(sorter, steepness, name)
    config = CheckConfig(
        n[0],
        n[1],
        (float(steepness_range[0]), float(steepness_range[1])),
        tuple(dtypes),
        None if reference is None else SorterUnderTest(reference, steepness),
        parity_atol,
    )
    report = SorterReport(under_test.name)
    for property_name in names:
        report.results.append(
            _outcome(property_name, under_test, config, max_examples, random_seed)
        )
    return report


def _outcome(
    name: str, under_test: SorterUnderTest, config: CheckConfig, max_examples: int, seed: int
) -> PropertyResult:
    """One property's result: not applicable, passed, or failed with its counterexample."""
    prop = PROPERTIES[name]
    reason = prop.not_applicable(under_test, config)
    if reason is not None:
        return PropertyResult(name, "not applicable", reason)
    try:
        _search(prop.check, under_test, config, max_examples, seed)
    except (PropertyViolationError, SorterCallError) as failure:
        return PropertyResult(name, "failed", str(failure))
    return PropertyResult(name, "passed")


def _check_ranges(
    max_examples: int, n: tuple[int, int], steepness_range: tuple[float, float]
) -> None:
    """Refuse a bad example count, size range or steepness range (``ValueError``)."""
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be an int >= 1 but is {max_examples!r}.")
    if len(n) != 2 or not 1 <= n[0] <= n[1]:
        raise ValueError(f"n must be (min_n, max_n) with 1 <= min_n <= max_n but is {n!r}.")
    if not 0 < steepness_range[0] <= steepness_range[1]:
        raise ValueError(f"steepness_range must be (low, high), 0 < low <= high: {steepness_range}")


def _search(
    check: Check, sorter: SorterUnderTest, config: CheckConfig, max_examples: int, seed_: int
) -> None:
    """Run ``check`` on hypothesis' examples; the exception of a minimal failing one escapes."""

    @seed(seed_)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        derandomize=False,  # the @seed decides, whatever profile the caller loaded
    )
    @given(data=st.data())
    def holds(data: st.DataObject) -> None:
        check(sorter, data, config)

    holds()


def check_soft_sort(
    sorter: Sorter, properties: str | Sequence[str] = "all", **options: object
) -> SorterReport:
    """``run_properties``, raising ``AssertionError`` with every counterexample on a failure.

    The one line of a user's test: ``check_soft_sort(my_sorter, properties="all",
    max_examples=200)``. Keyword options are those of ``run_properties``.

    Raises:
        AssertionError: Listing each failed property and its minimal counterexample.
        SorterError: If ``sorter`` is not a usable soft sorter.

    """
    report = run_properties(sorter, properties, **options)  # type: ignore[arg-type]
    if report.failures:
        raise AssertionError(report.as_text())
    return report
