"""Property-based testing of soft sorts: check any differentiable sorter, yours included.

Needs ``hypothesis`` (``pip install 'neco-loss[testing]'``). A sorter is any callable
``x -> (sorted_x, perm)`` or ``x -> perm`` on ``(rows, n)`` scores (optionally taking a
``steepness`` keyword); ``check_soft_sort`` runs every property on it with hypothesis and fails
with minimal counterexamples, ``run_properties`` returns the report instead, and
``neco check-sorter MODULE:FUNCTION`` does the same from the shell.

>>> import torch
>>> from neco_loss.testing import PROPERTIES
>>> sorted(PROPERTIES)[:3]
['ascending', 'cross_entropy', 'doubly_stochastic']
"""

from neco_loss.testing.properties import PROPERTIES, CheckConfig, Property, PropertyViolationError
from neco_loss.testing.runner import (
    PropertyResult,
    SorterReport,
    check_soft_sort,
    resolve_properties,
    run_properties,
)
from neco_loss.testing.sorter import SorterCallError, SorterError, SorterUnderTest
from neco_loss.testing.strategies import score_matrices, separated_rows, sizes, steepnesses

__all__ = [
    "PROPERTIES",
    "CheckConfig",
    "Property",
    "PropertyResult",
    "PropertyViolationError",
    "SorterError",
    "SorterCallError",
    "SorterReport",
    "SorterUnderTest",
    "check_soft_sort",
    "resolve_properties",
    "run_properties",
    "score_matrices",
    "separated_rows",
    "sizes",
    "steepnesses",
]
