"""A pytest plugin: the ``soft_sort_check`` fixture and a ``--soft-sort-examples`` option.

Enable it in a ``conftest.py`` with ``pytest_plugins = ["neco_loss.testing.pytest_plugin"]``
(or ``pytest -p neco_loss.testing.pytest_plugin``); a user's test is then one line::

    def test_my_sorter(soft_sort_check):
        soft_sort_check(my_sorter, properties="all")

``pytest --soft-sort-examples 500`` searches longer. Opt-in rather than registered for every
pytest run: loading it imports torch and hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

DEFAULT_EXAMPLES = 100


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--soft-sort-examples``."""
    parser.addoption(
        "--soft-sort-examples",
        type=int,
        default=DEFAULT_EXAMPLES,
        help=f"hypothesis examples per soft-sort property (default {DEFAULT_EXAMPLES})",
    )


@pytest.fixture
def soft_sort_check(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``check_soft_sort`` with ``max_examples`` from ``--soft-sort-examples`` by default."""
    from neco_loss.testing import check_soft_sort  # hypothesis: only when the fixture is used

    examples = request.config.getoption("--soft-sort-examples")

    def check(sorter: Any, properties: Any = "all", **options: Any) -> Any:
        options.setdefault("max_examples", examples)
        return check_soft_sort(sorter, properties, **options)

    return check
