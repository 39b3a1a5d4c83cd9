"""An experiment's report: rows with intervals over seeds and images, paired changes, a plot.

Rows are variants (plus the starting backbone and EMA teachers when scored). Every seed scores
its own images, so a row's interval (``statistics.bootstrap_estimate``: seeds, then images
within a seed, resampled) holds the noise of training and of evaluation; a comparison pairs
every row with a reference row seed by seed on the same images, with a p-value and, where
the interval includes 0, the smallest change the design could have detected. Metrics without
per-image counts (overclustering, fractions) get Student-t intervals over seeds.
"""

from __future__ import annotations

import json
import statistics as stats
from dataclasses import asdict
from pathlib import Path
from typing import Any

from neco_loss.app.experiment import ExperimentScores
from neco_loss.app.statistics import Estimate, bootstrap_estimate, seed_estimate

Rows = dict[str, dict[str, Estimate]]  # {row: {metric: estimate over seeds}}
COST_COLUMNS = {"seconds_per_step": "s/step", "peak_memory_mib": "peak MiB"}


def _metrics(scores: ExperimentScores, row: str) -> list[str]:
    return list(scores.per_run[scores.rows[row][0]])


def _estimate(
    scores: ExperimentScores, metric: str, runs: list[str], base: list[str] | None = None
) -> Estimate:
    """``metric`` over ``runs`` (paired with ``base``'s runs for a change).

    A bootstrap over seeds and images where every run kept its images' counts, else Student-t
    over the seeds' scores.
    """
    after = [scores.per_image.get(run, {}).get(metric) for run in runs]
    before = [scores.per_image.get(run, {}).get(metric) for run in base or []]
    if all(counts is not None for counts in after + before):
        counts = [c for c in after if c is not None], [c for c in before if c is not None]
        return bootstrap_estimate(counts[0], counts[1] if base is not None else None)
    values = [scores.per_run[run][metric] for run in runs]
    if base is None:
        return seed_estimate(values)
    others = [scores.per_run[run][metric] for run in base]
    return seed_estimate([v - o for v, o in zip(values, others, strict=True)], change=True)


def summarize(scores: ExperimentScores) -> Rows:
    """Every row's mean over its seeds with its interval, per metric."""
    return {
        row: {metric: _estimate(scores, metric, runs) for metric in _metrics(scores, row)}
        for row, runs in scores.rows.items()
    }


def paired_changes(scores: ExperimentScores, against: str) -> Rows:
    """Every other row's change from row ``against``, paired seed by seed on the same images.

    Run ``i`` of a row is paired with run ``i`` of ``against``: the same seed, so the same
    scored images (and, for two trained rows, the same crops and data order).
    """
    base = scores.rows[against]
    return {
        row: {metric: _estimate(scores, metric, runs, base) for metric in _metrics(scores, row)}
        for row, runs in scores.rows.items()
        if row != against
    }


def row_costs(scores: ExperimentScores) -> dict[str, dict[str, float]]:
    """Every trained row's median over seeds of seconds per step and peak memory (MiB)."""
    costs: dict[str, dict[str, float]] = {}
    for row, runs in scores.rows.items():
        measured = [scores.costs[run] for run in runs if run in scores.costs]
        for key in COST_COLUMNS:
            values = [cost[key] for cost in measured if cost.get(key) is not None]
            if values:
                costs.setdefault(row, {})[key] = stats.median(values)
    return costs


def write_report(
    results: Rows,
    scores: ExperimentScores,
    output: Path,
    context: dict[str, Any],
    comparisons: dict[str, Rows] | None = None,
    stem: str = "ablation",
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json``.

    The markdown holds the context, the table of means with intervals (then one column per
    comparison and metric, then each trained row's seconds per step and peak memory), and
    every run's scores.

    Args:
        results: ``summarize(scores)``.
        scores: The experiment's scores.
        output: Folder to write to.
        context: What the numbers depend on.
        comparisons: ``{against: paired_changes(scores, against)}``.
        stem: File name without suffix.

    """
    comparisons = comparisons or {}
    costs = row_costs(scores)
    markdown, data = output / f"{stem}.md", output / f"{stem}.json"
    markdown.write_text(_markdown(results, scores.per_run, context, comparisons, costs))
    summary = {
        row: {
            metric: {
                **asdict(value),
                "values": [scores.per_run[run][metric] for run in scores.rows[row]],
                **{
                    f"change_vs_{against}": asdict(changes[row][metric])
                    for against, changes in comparisons.items()
                    if row in changes
                },
            }
            for metric, value in metrics_of_row.items()
        }
        for row, metrics_of_row in results.items()
    }
    written = {
        "results": summary,
        "runs": scores.per_run,
        "costs": {"rows": costs, "runs": scores.costs},
        "context": context,
    }
    data.write_text(json.dumps(written, indent=2))
    return markdown, data


def _markdown(
    results: Rows,
    per_run: dict[str, dict[str, float]],
    context: dict[str, Any],
    comparisons: dict[str, Rows],
    costs: dict[str, dict[str, float]],
) -> str:
    """Context lines, the table of rows (with change and cost columns), every run's scores."""
    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    columns = metrics + [
        f"change in {metric} vs {against}" for against in comparisons for metric in metrics
    ]
    cost_keys = [key for key in COST_COLUMNS if any(key in row for row in costs.values())]
    columns += [COST_COLUMNS[key] for key in cost_keys]
    lines = [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", "| variant | seeds | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for name, cells in results.items():
        count = next(iter(cells.values())).count
        shown = [cells[metric].format() for metric in metrics]
        shown += [
            changes[name][metric].format(signed=True) if name in changes else ""
            for changes in comparisons.values()
            for metric in metrics
        ]
        shown += [
            f"{costs[name][key]:.3g}" if key in costs.get(name, {}) else "" for key in cost_keys
        ]
        lines.append(f"| {name} | {count} | " + " | ".join(shown) + " |")
    lines += ["", "Every run:", "", "| run | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    for name, run_scores in per_run.items():
        lines.append(f"| {name} | " + " | ".join(f"{run_scores[m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def plot(
    results: Rows,
    path: Path,
    title: str,
    x_label: str | None = None,
    x_values: dict[str, float] | None = None,
    changes: tuple[str, Rows] | None = None,
) -> Path:
    """One panel per metric: every row's mean as a point with its interval as error bars.

    A line over ``x_values`` when the variants vary a number (rows without a value, e.g. the
    starting backbone, are dashed lines); points side by side otherwise. The y axis spans
    the intervals with a margin of at least 0.05 mIoU, so that small differences are not
    drawn as large ones. With ``changes`` (``(reference, paired_changes(...))``), a second
    row of panels shows each row's paired change from the reference with its interval and the
    zero line: rows whose intervals overlap can still differ clearly on the same images.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    points = [name for name in results if not x_values or name in x_values]
    lines = [name for name in results if name not in points]
    figure, axes = plt.subplots(
        2 if changes else 1,
        len(metrics),
        figsize=(
            1.5 + (3.0 if x_values else 0.9 * len(points) + 0.5) * len(metrics),
            7.2 if changes else 3.8,
        ),
        squeeze=False,
    )
    for axis, metric in zip(axes[0], metrics, strict=True):
        _panel(axis, results, metric, (points, lines), x_values, x_label)
    if changes:
        reference, differences = changes
        shown = [name for name in points if name in differences]
        for axis, metric in zip(axes[1], metrics, strict=True):
            _change_panel(axis, differences, metric, (reference, shown), x_values, x_label)
    count = max(cell.count for row in results.values() for cell in row.values())
    figure.suptitle(
        f"{title}: mean and 95% interval over {count} seeds (seeds and scored images resampled)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _panel(
    axis: Any,
    results: Rows,
    metric: str,
    rows: tuple[list[str], list[str]],
    x_values: dict[str, float] | None,
    x_label: str | None,
) -> None:
    """One metric's panel: ``rows[0]`` as points with error bars, ``rows[1]`` as lines."""
    points, lines = rows
    means, errors = _bars([results[name][metric] for name in points])
    lows = [mean - below for mean, below in zip(means, errors[0], strict=True)]
    highs = [mean + above for mean, above in zip(means, errors[1], strict=True)]
    xs = [x_values[name] for name in points] if x_values else list(range(len(points)))
    style = "-" if x_values else "none"
    axis.errorbar(xs, means, yerr=errors, marker="o", capsize=4, linestyle=style)
    _x_axis(axis, xs, points, x_values, x_label)
    for index, name in enumerate(lines):
        mean = results[name][metric].mean
        axis.axhline(mean, color=f"C{index + 1}", linestyle="--", label=name)
    if lines:
        axis.legend(fontsize=7)
    values = lows + highs + [results[name][metric].mean for name in lines]
    middle, spread = (min(values) + max(values)) / 2, max(values) - min(values)
    half = max(0.6 * spread, 0.025)  # at least 0.05 mIoU tall: small gaps look small
    axis.set_ylim(middle - half, middle + half)
    axis.set_ylabel(metric)


def _change_panel(
    axis: Any,
    differences: Rows,
    metric: str,
    rows: tuple[str, list[str]],
    x_values: dict[str, float] | None,
    x_label: str | None,
) -> None:
    """One metric's paired changes from ``rows[0]`` for the rows ``rows[1]``, zero dashed."""
    reference, shown = rows
    means, errors = _bars([differences[name][metric] for name in shown])
    xs = [x_values[name] for name in shown] if x_values else list(range(len(shown)))
    axis.errorbar(
        xs, means, yerr=errors, marker="o", capsize=4, linestyle="-" if x_values else "none"
    )
    axis.axhline(0.0, color="grey", linestyle="--", linewidth=1, label=reference)
    _x_axis(axis, xs, shown, x_values, x_label)
    axis.legend(fontsize=7)
    axis.set_ylabel(f"change in {metric} vs {reference}\n(paired, same seed and images)")


def _x_axis(
    axis: Any,
    xs: list[float] | list[int],
    names: list[str],
    x_values: dict[str, float] | None,
    x_label: str | None,
) -> None:
    """The x axis: the varied number (log scale over a decade and more), else the names."""
    if x_values:
        if max(xs) > 10 * min(xs) > 0:
            axis.set_xscale("log")
        axis.set_xlabel(x_label or "")
    else:
        axis.set_xticks(xs, names, rotation=25, ha="right")


def _bars(cells: list[Estimate]) -> tuple[list[float], list[list[float]]]:
    """Means and error bars ``[below, above]`` (none where an estimate has no interval)."""
    means = [cell.mean for cell in cells]
    below = [cell.mean - cell.low if cell.low is not None else 0.0 for cell in cells]
    above = [cell.high - cell.mean if cell.high is not None else 0.0 for cell in cells]
    return means, [below, above]
