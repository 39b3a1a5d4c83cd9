"""An experiment's report: rows with intervals over seeds, paired changes, a table, a plot.

Rows are variants (plus the starting backbone and EMA teachers when scored); a row's value is
the mean over its seeds with the half-width of the 95% Student-t interval
(``statistics.mean_interval``); a comparison pairs every row with a reference row seed by seed
(``statistics.paired_change``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from neco_loss.app.experiment import BASELINE, ExperimentScores
from neco_loss.app.statistics import MeanInterval, mean_interval, paired_change

Rows = dict[str, dict[str, MeanInterval]]  # {row: {metric: interval over seeds}}


def summarize(scores: ExperimentScores) -> Rows:
    """Every row's mean and 95% interval over its seeds, per metric."""
    return {
        row: {
            metric: mean_interval([scores.per_run[run][metric] for run in runs])
            for metric in scores.per_run[runs[0]]
        }
        for row, runs in scores.rows.items()
    }


def paired_changes(scores: ExperimentScores, against: str) -> Rows:
    """Every other row's change from row ``against``, paired seed by seed, with its interval.

    A row scored once (the starting backbone, which does not depend on the training seed) is
    paired with every seed; otherwise run ``i`` of a row is paired with run ``i`` of
    ``against`` (the same seed: the same crops and data order).
    """
    base = scores.rows[against]
    changes = {}
    for row, runs in scores.rows.items():
        if row in (against, BASELINE):
            continue
        paired = base * len(runs) if len(base) == 1 else base
        changes[row] = {
            metric: paired_change(
                [scores.per_run[run][metric] for run in paired],
                [scores.per_run[run][metric] for run in runs],
            )
            for metric in scores.per_run[runs[0]]
        }
    return changes


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
    comparison and metric), and every run's scores.

    Args:
        results: ``summarize(scores)``.
        scores: The experiment's scores.
        output: Folder to write to.
        context: What the numbers depend on.
        comparisons: ``{against: paired_changes(scores, against)}``.
        stem: File name without suffix.

    """
    comparisons = comparisons or {}
    markdown, data = output / f"{stem}.md", output / f"{stem}.json"
    markdown.write_text(_markdown(results, scores.per_run, context, comparisons))
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
    written = {"results": summary, "runs": scores.per_run, "context": context}
    data.write_text(json.dumps(written, indent=2))
    return markdown, data


def _markdown(
    results: Rows,
    per_run: dict[str, dict[str, float]],
    context: dict[str, Any],
    comparisons: dict[str, Rows],
) -> str:
    """Context lines, the table of rows (with change columns), the table of every run."""
    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    columns = metrics + [
        f"change in {metric} vs {against}" for against in comparisons for metric in metrics
    ]
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
) -> Path:
    """One panel per metric: every variant's mean with its 95% interval as error bars.

    A line over ``x_values`` when the variants vary a number, bars otherwise; the starting
    backbone, when scored, is a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    variants = [name for name in results if name != BASELINE]
    figure, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(1.5 + (3.0 if x_values else 1.0 * len(variants)) * len(metrics), 3.6),
        squeeze=False,
    )
    for axis, metric in zip(axes[0], metrics, strict=True):
        cells = [results[name][metric] for name in variants]
        errors = [cell.half_width or 0.0 for cell in cells]
        means = [cell.mean for cell in cells]
        if x_values:
            xs = [x_values[name] for name in variants]
            axis.errorbar(xs, means, yerr=errors, marker="o", capsize=4)
            if max(xs) > 10 * min(xs) > 0:
                axis.set_xscale("log")
            axis.set_xlabel(x_label or "")
        else:
            axis.bar(range(len(variants)), means, yerr=errors, capsize=4, color="tab:blue")
            axis.set_xticks(range(len(variants)), variants, rotation=20)
        low = min(m - e for m, e in zip(means, errors, strict=True))
        high = max(m + e for m, e in zip(means, errors, strict=True))
        if BASELINE in results:
            start = results[BASELINE][metric].mean
            axis.axhline(start, color="grey", linestyle="--", label=BASELINE)
            axis.legend(fontsize=8)
            low, high = min(low, start), max(high, start)
        axis.set_ylabel(metric)
        margin = 0.15 * (high - low) + 0.005
        axis.set_ylim(low - margin, high + margin)
    count = max(cell.count for row in results.values() for cell in row.values())
    figure.suptitle(f"ablation: {title} (mean and 95% interval over {count} seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
