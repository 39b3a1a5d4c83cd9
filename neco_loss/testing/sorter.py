"""A soft sorter under test: any callable, checked once and called the same way everywhere.

A sorter is ``sorter(x) -> (sorted_x, perm)`` or ``sorter(x) -> perm`` for ``x`` of shape
``(rows, n)``, with ``perm (rows, n, n)``, ``perm[r, i, j]`` the probability that element ``i``
lands at rank ``j`` (ascending) and ``sorted_x (rows, n)``. A sorter that accepts a keyword
``steepness`` is called with the inverse temperature the property draws; otherwise the
``steepness`` the user declares (what the sorter runs at) sets the properties' tolerances.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Sorter = Callable[..., Any]


class SorterError(TypeError):
    """The callable is not a soft sorter.

    It is not callable, raises on a plain input, or returns the wrong kind or shape of output.
    """


class SorterCallError(AssertionError):
    """The sorter raised on an input a property gave it (reported as that property's failure)."""


@dataclass(frozen=True)
class SortOutput:
    """What a sorter returned for ``x``.

    Attributes:
        sorted_x: ``(rows, n)``, or ``None`` for a sorter that returns ``perm`` only.
        perm: ``(rows, n, n)``.

    """

    sorted_x: Tensor | None
    perm: Tensor


def describe(x: Tensor, limit: int = 12) -> str:
    """``x`` as a short readable list of rows (at most ``limit`` values per row)."""

    def row_text(row: list[float]) -> str:
        values = ", ".join(f"{v:.4g}" for v in row[:limit])
        return "[" + values + (", ..." if len(row) > limit else "") + "]"

    rows = x.detach().double().tolist()
    text = ", ".join(row_text(row) for row in rows[:4])
    return "[" + text + (", ..." if len(rows) > 4 else "") + "]"


class SorterUnderTest:
    """A user's sorter, validated on a probe input and called with a steepness when it takes one.

    Args:
        sorter: The callable (see the module docstring).
        steepness: The inverse temperature a sorter without a ``steepness`` parameter runs at
            (sets tolerances); ignored for sorters that take one.
        name: How reports name it (default: the callable's qualified name).

    Raises:
        SorterError: If ``sorter`` is not callable, raises on a ``(2, 3)`` float64 input, or
            returns something other than ``perm (rows, n, n)`` or ``(sorted_x, perm)``.

    """

    def __init__(self, sorter: Sorter, steepness: float = 100.0, name: str | None = None) -> None:
        if not callable(sorter):
            raise SorterError(
                "sorter must be a callable x -> (sorted_x, perm) or x -> perm, but is "
                f"{type(sorter).__name__}: {sorter!r}."
            )
        if not (isinstance(steepness, (int, float)) and steepness > 0):
            raise ValueError(f"steepness must be a number > 0 but is {steepness!r}.")
        self.sorter = sorter
        self.fixed_steepness = float(steepness)
        self.name = name or getattr(sorter, "__qualname__", None) or repr(sorter)
        self.takes_steepness = _accepts_keyword(sorter, "steepness")
        probe = torch.tensor([[0.3, -1.0, 2.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
        try:
            output = self._call(probe, self.fixed_steepness)
        except SorterError:
            raise
        except Exception as error:
            raise SorterError(
                f"the sorter {self.name} raised {type(error).__name__}: {error} on a (2, 3) "
                "float64 input; a sorter must accept (rows, n) float tensors."
            ) from error
        self.returns_sorted = output.sorted_x is not None

    def __call__(self, x: Tensor, steepness: float | None = None) -> SortOutput:
        """Sort ``x``; the sorter's own exceptions become ``SorterCallError`` naming the input."""
        steepness = self.fixed_steepness if steepness is None else steepness
        try:
            return self._call(x, steepness)
        except SorterError:
            raise
        except Exception as error:
            raise SorterCallError(
                f"n = {x.shape[1]}, input {describe(x)}: the sorter raised "
                f"{type(error).__name__}: {str(error).strip()[:300]}"
            ) from error

    def steepness_for(self, drawn: float) -> float:
        """The steepness a call runs at: ``drawn`` if the sorter takes one, else its own."""
        return drawn if self.takes_steepness else self.fixed_steepness

    def _call(self, x: Tensor, steepness: float) -> SortOutput:
        result = self.sorter(x, steepness=steepness) if self.takes_steepness else self.sorter(x)
        return _as_output(result, x, self.name)


def _accepts_keyword(function: Sorter, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _as_output(result: Any, x: Tensor, name: str) -> SortOutput:
    rows, n = x.shape
    expected = (
        f"perm of shape ({rows}, {n}, {n}) or (sorted_x ({rows}, {n}), perm) for an input of "
        f"shape ({rows}, {n})"
    )
    if isinstance(result, Tensor):
        sorted_x, perm = None, result
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        sorted_x, perm = result
    else:
        raise SorterError(f"the sorter {name} must return {expected}, not {_kind(result)}.")
    for value in (sorted_x, perm):
        if value is not None and not (isinstance(value, Tensor) and value.is_floating_point()):
            raise SorterError(
                f"the sorter {name} must return float tensors ({expected}), not {_kind(result)}."
            )
    if perm.shape != (rows, n, n) or (sorted_x is not None and sorted_x.shape != (rows, n)):
        raise SorterError(f"the sorter {name} must return {expected}, not {_kind(result)}.")
    return SortOutput(sorted_x, perm)


def _kind(result: Any) -> str:
    if isinstance(result, Tensor):
        return f"a tensor of shape {tuple(result.shape)}"
    if isinstance(result, (tuple, list)):
        parts = ", ".join(_kind(part) for part in result)
        return f"a {type(result).__name__} of {len(result)} ({parts})"
    return f"{type(result).__name__} {result!r}"[:200]
