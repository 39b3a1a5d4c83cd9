"""``neco check-sorter``: property-based checks of any soft sorter, with counterexamples."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "check-sorter"
HELP = "property-based checks of any soft sorter (neco_loss.testing), with counterexamples"


def _size_range(text: str) -> tuple[int, int]:
    """``"1..130"`` (or ``"22"``) as ``(min_n, max_n)``."""
    low, _, high = text.partition("..")
    try:
        sizes = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN..MAX such as 1..130, got {text!r}"
        ) from None
    if not 1 <= sizes[0] <= sizes[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sorters, sizes, properties, examples, steepness, reference, seed, report options."""
    parser.add_argument(
        "sorters",
        nargs="*",
        help="MODULE:FUNCTION of a sorter x -> (sorted_x, perm) or x -> perm (optionally taking "
        "steepness=), or a report name such as diffsort/bitonic/cauchy",
    )
    parser.add_argument("--n", type=_size_range, default=(1, 130), help="sizes MIN..MAX")
    parser.add_argument(
        "--properties",
        nargs="+",
        default=["all"],
        help="'all' (every property but the optional gradgradcheck) and/or property names",
    )
    parser.add_argument("--max-examples", type=int, default=50, help="per property")
    parser.add_argument(
        "--steepness",
        type=float,
        default=100.0,
        help="the steepness of a sorter without a steepness parameter (sets tolerances)",
    )
    parser.add_argument("--reference", default=None, help="a sorter for the parity property")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis' search seed")
    parser.add_argument(
        "--report", action="store_true", help="also check every sorter of the published report"
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced: 3 report sorters, n <= 24, 5 examples"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the properties on each sorter; print the tables; 1 if a property failed."""
    from neco_loss.testing import SorterError, resolve_properties, run_properties
    from neco_loss.testing.report import QUICK, load_sorter, markdown_table, named_sorters

    specs = list(args.sorters)
    if args.report:  # the published report also checks second derivatives
        specs += list(QUICK if args.quick else named_sorters())
        args.properties = [*args.properties, "gradgradcheck"]
    if not specs:
        raise SystemExit("error: name a sorter (MODULE:FUNCTION or a report name), or --report")
    try:
        properties = resolve_properties(args.properties)
        sorters = [load_sorter(spec) for spec in specs]
        reference = load_sorter(args.reference).sorter if args.reference else None
    except (SorterError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    max_n = min(args.n[1], 24) if args.quick else args.n[1]
    reports = []
    for named in sorters:
        try:
            report = run_properties(
                named.sorter,
                properties,
                max_examples=5 if args.quick else args.max_examples,
                n=(max(args.n[0], named.min_n), max(max_n, named.min_n)),
                steepness=args.steepness,
                reference=reference,
                random_seed=args.seed,
                name=named.name,
            )
        except SorterError as error:
            raise SystemExit(f"error: {error}") from None
        print(report.as_text(), flush=True)
        reports.append(report)
    if args.markdown:
        notes = {named.name: named.note for named in sorters if named.note}
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(reports, notes))
        print(f"table written to {args.markdown}")
    failed = any(report.failures for report in reports)
    return 1 if failed and not args.report else 0
