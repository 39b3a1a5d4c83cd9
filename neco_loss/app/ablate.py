"""``neco ablate FILE``: train the variants of an ablation file, score each, one table, one plot.

Every variant trains into ``OUTPUT/<variant>/seed<N>`` and is scored by the in-context and
linear protocols on ``SyntheticScenes`` (or ``evaluation.dataset`` with ``data_root``) through
the experiment runner (``neco_loss.app.experiment``); the results go to ``OUTPUT/ablation.md``,
``ablation.json`` and ``ablation.png`` (``neco_loss.app.experiment_report``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from neco_loss.app.ablation_file import Ablation, check_seeds, load_ablation, merge
from neco_loss.app.experiment import (
    BASELINE,
    Experiment,
    ExperimentScores,
    Scoring,
    run_experiment,
)
from neco_loss.app.experiment_report import Rows, paired_changes, plot, summarize, write_report
from neco_loss.app.statistics import CONFIDENCE
from neco_loss.evaluation.suite import run_context
from neco_loss.training import TrainConfig, build_config

NAME = "ablate"
HELP = (
    "train and evaluate the variants of an ablation file; '--key value' overrides apply "
    "to every variant"
)
TAKES_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ablation file, ``--output``, ``--seeds``, ``--quiet``."""
    parser.add_argument(
        "ablation", type=Path, help="an ablation file, e.g. examples/ablations/loss.yaml"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="default: outputs/ablations/<file name>"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train every variant with each of these seeds (default: the file's 'seeds', else "
        "the config's seed)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Run the ablation; print its table."""
    output = args.output or Path("outputs/ablations") / args.ablation.stem
    run_ablation(args.ablation, output, overrides, progress=not args.quiet, seeds=args.seeds)
    print((output / "ablation.md").read_text(), end="")
    print(f"table, plot and per-variant runs in {output}")


def _run_configs(
    ablation: Ablation, output: Path, overrides: list[str], seeds: list[int] | None
) -> dict[tuple[str, int], TrainConfig]:
    """``{(variant, seed): config}``, each training into ``output/<variant>/seed<N>``.

    Every configuration is built (so validated) before any training starts.
    """
    seeds = seeds or ablation.seeds
    if seeds is not None and "--seed" in (override.split("=")[0] for override in overrides):
        raise ValueError(
            "--seed conflicts with the ablation's seeds: give them with --seeds (or the file's "
            "'seeds' key), not --seed."
        )
    configs = {}
    for name, changes in ablation.variants.items():
        variant = merge(ablation.base, changes)
        for seed in seeds or [build_config(variant, overrides).seed]:
            run = {"seed": seed, "output_dir": str(output / name / f"seed{seed}")}
            configs[name, seed] = build_config(merge(variant, run), overrides)
    return configs


def run_ablation(
    path: Path,
    output: Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    seeds: list[int] | None = None,
) -> Rows:
    """Train every variant with every seed, evaluate all, write the table and the plot.

    Args:
        path: The ablation file.
        output: Folder for the runs (``<variant>/seed<N>``), ``ablation.md``, ``ablation.json``,
            ``ablation.png`` and the evaluation pictures (``evaluation/``).
        overrides: ``--key value`` changes applied to every run.
        progress: Show progress bars.
        seeds: Seeds to train with, instead of the file's ``seeds``.

    Returns:
        ``{row: {metric: Estimate over seeds}}``; rows are the variants, after the starting
        backbone's row when the file asks for a baseline.

    """
    ablation = load_ablation(path)
    if seeds is not None:
        seeds = check_seeds(list(seeds), "--seeds")
    configs = _run_configs(ablation, output, list(overrides or []), seeds)
    experiment = Experiment(configs, Scoring(**ablation.evaluation), baseline=ablation.baseline)
    scores = run_experiment(experiment, output, progress)
    context = _context(path, overrides, configs, scores, ablation.evaluation)
    comparisons = {}
    if ablation.baseline:  # scored on every seed's images: truly paired
        comparisons["start"] = paired_changes(scores, BASELINE)
    if ablation.reference:
        comparisons[ablation.reference] = paired_changes(scores, ablation.reference)
    results = summarize(scores)
    write_report(results, scores, output, run_context(context), comparisons)
    shown = ablation.reference or ("start" if ablation.baseline else None)
    plot(
        results,
        output / "ablation.png",
        path.stem,
        ablation.x_label,
        ablation.x_values,
        (shown, comparisons[shown]) if shown else None,
    )
    return results


def _context(
    path: Path,
    overrides: list[str] | None,
    configs: dict[tuple[str, int], TrainConfig],
    scores: ExperimentScores,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """What an ablation's numbers depend on, for the head of ``ablation.md``."""
    return {
        "ablation": str(path),
        "overrides": " ".join(overrides or []) or None,
        "seeds": sorted({seed for _, seed in configs}),
        "starting backbone": next(iter(configs.values())).weights,
        "dataset": settings["dataset"],
        "image_size": scores.image_size,
        "train_images": scores.train_images,
        "val_images": scores.val_images,
        "images": "each seed scores its own (val and memory/probe images drawn with the seed)",
        "split": settings["split"],
        "linear_epochs": settings["linear_epochs"],
        "interval": f"mean [{CONFIDENCE:.0%} interval] of a two-level bootstrap (seeds, then "
        "each seed's scored images, resampled; changes paired on the same images), p-value of "
        "no change, and for an interval including 0 the smallest change detectable at 5% "
        "with 80% power",
    }
