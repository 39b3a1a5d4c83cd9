"""The property report: named sorters, ``MODULE:FUNCTION`` sorters, the markdown table.

The named sorters are diffsort as users call it, torchsort (our permutation construction) and
our backends.

``neco check-sorter --report --markdown docs/sorter_report.md`` regenerates the published
table; ``--quick`` is the reduced form CI runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from neco_loss.sorting import RELAXATIONS
from neco_loss.testing.properties import PROPERTIES
from neco_loss.testing.runner import SorterReport
from neco_loss.testing.sorter import Sorter, SorterError


@dataclass(frozen=True)
class NamedSorter:
    """A sorter of the report.

    Attributes:
        name: ``library/network/relaxation`` (what the CLI accepts).
        sorter: ``(x, steepness) -> (sorted_x, perm)``.
        min_n: Smallest size it is checked at (raw diffsort cannot run n = 1).
        note: What the report says about it besides the properties.

    """

    name: str
    sorter: Sorter
    min_n: int = 1
    note: str = ""


def _diffsort(network: str, relaxation: str) -> Sorter:
    """``diffsort.DiffSortNet`` exactly as a user calls it (no size check of ours)."""

    def sort(x: Tensor, steepness: float) -> tuple[Tensor, Tensor]:
        import diffsort

        net = diffsort.DiffSortNet(
            network, x.shape[1], steepness=steepness, distribution=relaxation
        )
        return net.to(x.device)(x)

    return sort


def _backend(backend: str, network: str, relaxation: str) -> Sorter:
    def sort(x: Tensor, steepness: float) -> tuple[Tensor, Tensor]:
        from neco_loss import soft_permutation

        return soft_permutation(x, network, steepness, relaxation, backend)

    return sort


def named_sorters() -> dict[str, NamedSorter]:
    """Every sorter of the published report, by name."""
    sorters = [
        NamedSorter(
            f"diffsort/{network}/{relaxation}",
            _diffsort(network, relaxation),
            min_n=2,
            note="raises IndexError at n = 1 (its network has no layer), checked from n = 2",
        )
        for network in ("bitonic", "odd_even")
        for relaxation in RELAXATIONS
    ]
    sorters.append(
        NamedSorter("torchsort/soft_rank/l2", _backend("torchsort", "bitonic", "cauchy"))
    )
    sorters += [
        NamedSorter(f"{backend}/{network}/cauchy", _backend(backend, network, "cauchy"))
        for backend in ("native", "native-python")
        for network in ("bitonic_padded", "odd_even")
    ]
    return {sorter.name: sorter for sorter in sorters}


QUICK = ("diffsort/bitonic/cauchy", "torchsort/soft_rank/l2", "native/bitonic_padded/cauchy")


def load_sorter(spec: str) -> NamedSorter:
    """A named report sorter, or ``MODULE:FUNCTION`` imported from the current environment.

    Raises:
        SorterError: If the module or the function cannot be found (says what was expected).

    """
    known = named_sorters()
    if spec in known:
        return known[spec]
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise SorterError(
            f"sorter must be MODULE:FUNCTION (e.g. mypackage.sorting:my_sort) or one of "
            f"{sorted(known)}, but is {spec!r}."
        )
    if os.getcwd() not in sys.path:  # find the user's modules as ``python -m`` would
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SorterError(f"cannot import module {module_name!r} of {spec!r}: {error}") from error
    try:
        function = getattr(module, function_name)
    except AttributeError as error:
        raise SorterError(f"module {module_name!r} has no {function_name!r} ({spec!r}).") from error
    return NamedSorter(spec, function)


def markdown_table(reports: Sequence[SorterReport], notes: dict[str, str]) -> str:
    """Property x sorter table (pass / FAIL / n/a), then each failure's first counterexample."""
    names = [
        name
        for name in PROPERTIES
        if any(result.name == name for report in reports for result in report.results)
    ]
    marks = {"passed": "pass", "failed": "**FAIL**", "not applicable": "n/a"}
    lines = ["| sorter | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for report in reports:
        status = {result.name: marks[result.status] for result in report.results}
        lines.append(
            f"| `{report.sorter}` | " + " | ".join(status.get(n, "") for n in names) + " |"
        )
    lines += ["", "First counterexamples (minimal, as hypothesis shrank them):", ""]
    for report in reports:
        for result in report.failures:
            lines.append(f"- `{report.sorter}`, {result.name}: {result.detail}")
    by_note: dict[str, list[str]] = {}
    for sorter, note in notes.items():
        by_note.setdefault(note, []).append(f"`{sorter}`")
    lines += ["", *[f"- {', '.join(names)}: {note}" for note, names in by_note.items()]]
    return "\n".join(lines) + "\n"
