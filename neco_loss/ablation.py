"""``neco ablate``: train variants of a configuration, evaluate each, one table and one plot.

An ablation file names a base configuration and the variants as overrides of it::

    base: ../recipes/tiny_cpu.yaml        # relative to the ablation file
    variants:
      CE: {}
      L1: {loss: {loss: l1}}
    evaluation: {train_images: 200, val_images: 64, linear_epochs: 10}

Every variant trains into ``OUTPUT/<variant>`` and is scored by the in-context and linear
protocols on ``SyntheticScenes`` (or ``evaluation.dataset`` with ``data_root``); the results go
to ``OUTPUT/ablation.md``, ``ablation.json`` and ``ablation.png``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from neco_loss.evaluation.datasets import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from neco_loss.evaluation.suite import evaluate, evaluation_splits, run_context
from neco_loss.models import DenseViT
from neco_loss.statistics import CONFIDENCE, MeanInterval, mean_interval, paired_change
from neco_loss.training import TrainConfig, build_config
from neco_loss.training.distributed import launch
from neco_loss.training.run_folder import LAST
from neco_loss.yaml_files import read_yaml

EVALUATION_DEFAULTS: dict[str, Any] = {
    "dataset": "synthetic",
    "data_root": None,
    "image_size": None,
    "train_images": 200,
    "val_images": 64,
    "split": "val",  # the split scored; SyntheticScenes also has "test"
    "linear_epochs": 10,
    "protocols": ["in-context", "linear"],
}
ABLATION_KEYS = ("base", "variants", "evaluation", "seeds", "baseline", "x", "reference")


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; nested mappings are merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class Ablation:
    """A parsed ablation file.

    Attributes:
        base: The base configuration (``TrainConfig`` keys).
        variants: ``{name: overrides of base}``.
        evaluation: Evaluation settings (``EVALUATION_DEFAULTS`` keys).
        seeds: Seeds every variant is trained with; ``None``: the configuration's seed.
        baseline: Also score the base's starting backbone (its ``weights``) as a row.
        x_label: Name of the numeric setting the variants vary, for a line plot.
        x_values: ``{variant: value of that setting}``.
        reference: A variant every other one is compared with, seed by seed.

    """

    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    evaluation: dict[str, Any]
    seeds: list[int] | None = None
    baseline: bool = False
    x_label: str | None = None
    x_values: dict[str, float] = field(default_factory=dict)
    reference: str | None = None


def _check_seeds(seeds: Any, source: str) -> list[int]:
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"{source} must be a non-empty list of distinct ints but is {seeds!r}.")
    return seeds


def _check_x(spec: Any, variants: dict[str, Any], path: Path) -> tuple[str, dict[str, float]]:
    if not isinstance(spec, dict) or set(spec) != {"label", "values"}:
        raise ValueError(f"'x' of {path} must be {{label: ..., values: {{variant: number}}}}.")
    values = spec["values"]
    if not isinstance(values, dict) or set(values) != set(variants):
        raise ValueError(
            f"'x.values' of {path} must give a number for every variant {list(variants)} but "
            f"covers {list(values) if isinstance(values, dict) else values!r}."
        )
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"'x.values.{name}' of {path} must be a number but is {value!r}.")
    return str(spec["label"]), {name: float(value) for name, value in values.items()}


def load_ablation(path: Path) -> Ablation:
    """Parse and check an ablation file.

    Keys: ``base`` and ``variants``; optional ``evaluation``, ``seeds``, ``baseline``, ``x``,
    ``reference``.

    Raises:
        FileNotFoundError: If the file or its base config does not exist.
        ValueError: If it lacks ``base`` or ``variants``, has unknown keys, or a key has the
            wrong form.

    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ablation file {path} does not exist.")
    spec = read_yaml(path.read_text(), f"ablation file {path}") or {}
    unknown = sorted(set(spec) - set(ABLATION_KEYS))
    if unknown or "base" not in spec or not spec.get("variants"):
        raise ValueError(
            f"ablation file {path} needs 'base' and 'variants' (and may have "
            f"{list(ABLATION_KEYS[2:])}); unknown keys: {unknown}."
        )
    base = spec["base"]
    if isinstance(base, str):
        base_path = (path.parent / base).expanduser()
        if not base_path.is_file():
            raise FileNotFoundError(f"base config {base_path} of {path} does not exist.")
        base = read_yaml(base_path.read_text(), f"base config {base_path}") or {}
    evaluation = merge(EVALUATION_DEFAULTS, spec.get("evaluation") or {})
    unknown = sorted(set(evaluation) - set(EVALUATION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown evaluation keys {unknown}; valid: {list(EVALUATION_DEFAULTS)}.")
    if evaluation["split"] not in ("val", "test"):
        # Training images are never scored: an unknown name must not fall back to them.
        raise ValueError(
            f"'evaluation.split' of {path} must be 'val' or 'test' but is {evaluation['split']!r}."
        )
    variants = {
        _variant_name(name, path): changes or {} for name, changes in spec["variants"].items()
    }
    ablation = Ablation(base, variants, evaluation)
    if "seeds" in spec:
        ablation.seeds = _check_seeds(spec["seeds"], f"'seeds' of {path}")
    if "baseline" in spec:
        if not isinstance(spec["baseline"], bool):
            raise ValueError(f"'baseline' of {path} must be true or false.")
        ablation.baseline = spec["baseline"]
    if "x" in spec:
        ablation.x_label, ablation.x_values = _check_x(spec["x"], variants, path)
    if "reference" in spec:
        if spec["reference"] not in variants:
            raise ValueError(
                f"'reference' of {path} must name a variant ({list(variants)}) but is "
                f"{spec['reference']!r}."
            )
        ablation.reference = spec["reference"]
    return ablation


def _variant_name(name: Any, path: Path) -> str:
    """A variant's name if it stays inside the output folder (it names ``OUTPUT/<name>``).

    ``100/1000`` (a sub-folder) is fine; an absolute path, ``..`` or an empty name are not.

    Raises:
        ValueError: Naming the variant and the file.

    """
    parts = PurePosixPath(str(name)).parts
    if not isinstance(name, str) or not parts or parts[0] == "/" or ".." in parts:
        raise ValueError(
            f"variant name {name!r} of {path} must be a relative name without '..': each "
            "variant trains into OUTPUT/<name>, inside the ablation's output folder."
        )
    return name


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
) -> dict[str, dict[str, MeanInterval]]:
    """Train every variant with every seed, evaluate all, write the table and the plot.

    Args:
        path: The ablation file.
        output: Folder for the runs (``<variant>/seed<N>``), ``ablation.md``, ``ablation.json``,
            ``ablation.png`` and the evaluation pictures (``evaluation/``).
        overrides: ``--key value`` changes applied to every run.
        progress: Show progress bars.
        seeds: Seeds to train with, instead of the file's ``seeds``.

    Returns:
        ``{row: {metric: MeanInterval over seeds}}``; rows are the variants, after the starting
        backbone's row when the file asks for a baseline.

    """
    ablation = load_ablation(path)
    if seeds is not None:
        seeds = _check_seeds(list(seeds), "--seeds")
    configs = _run_configs(ablation, output, list(overrides or []), seeds)
    first = next(iter(configs.values()))
    backbones = {}
    if ablation.baseline:
        if first.weights is None:
            raise ValueError(
                f"'baseline: true' in {path} scores the starting backbone, but the base config "
                "has no 'weights' (the backbone NeCo starts from)."
            )
        start = DenseViT(first.model, checkpoint=first.weights, **first.model_kwargs)
        backbones[BASELINE] = torch.no_grad()(start.eval())
    for (name, seed), config in configs.items():
        print(f"== variant {name}, seed {seed}")
        # A run trained before (an interrupted or repeated ablation) is continued, or reused
        # when it finished; one whose settings changed is refused by resume.
        resume = (config.output_dir_path / LAST).exists()
        result = launch(config, resume=resume, progress=progress)
        backbone = DenseViT(config.model, checkpoint=result.backbone, **config.model_kwargs)
        backbones[_run_name(name, seed)] = torch.no_grad()(backbone.eval())
    settings = ablation.evaluation
    size = settings["image_size"] or (
        first.image_size if settings["dataset"] == "synthetic" else 448
    )
    train_set, val_set = evaluation_splits(
        settings["dataset"],
        settings["data_root"],
        size,
        settings["train_images"],
        settings["val_images"],
        val_split=settings["split"],
    )
    per_run = evaluate(
        backbones,
        train_set,
        val_set,
        NUM_CLASSES[settings["dataset"]],
        settings["protocols"],
        output / "evaluation",
        ignore_index=IGNORE_INDEX,
        linear_epochs=settings["linear_epochs"],
        progress=progress,
        class_names=CLASS_NAMES.get(settings["dataset"]),
    )
    rows = [BASELINE] if ablation.baseline else []
    runs = {row: [row] for row in rows}
    for name, seed in configs:
        runs.setdefault(name, []).append(_run_name(name, seed))
    results = {
        row: {
            metric: mean_interval([per_run[run][metric] for run in names])
            for metric in per_run[names[0]]
        }
        for row, names in runs.items()
    }
    context = {
        "ablation": str(path),
        "overrides": " ".join(overrides or []) or None,
        "seeds": sorted({seed for _, seed in configs}),
        "starting backbone": first.weights,
        "dataset": settings["dataset"],
        "image_size": size,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "split": settings["split"],
        "linear_epochs": settings["linear_epochs"],
        "interval": f"mean ± half-width of the {CONFIDENCE:.0%} Student-t interval over seeds",
    }
    comparisons = {}
    if ablation.baseline:  # scored once: it does not depend on the training seed
        comparisons["start"] = _paired_changes(per_run, runs, BASELINE)
    if ablation.reference:
        comparisons[ablation.reference] = _paired_changes(per_run, runs, ablation.reference)
    write_ablation(results, per_run, runs, output, run_context(context), comparisons)
    plot(results, output / "ablation.png", path.stem, ablation.x_label, ablation.x_values)
    return results


BASELINE = "start (no NeCo)"


def _run_name(variant: str, seed: int) -> str:
    return f"{variant} (seed {seed})"


def write_ablation(
    results: dict[str, dict[str, MeanInterval]],
    per_run: dict[str, dict[str, float]],
    runs: dict[str, list[str]],
    output: Path,
    context: dict[str, Any],
    comparisons: dict[str, dict[str, dict[str, MeanInterval]]] | None = None,
) -> tuple[Path, Path]:
    """Write ``ablation.md`` and ``ablation.json``.

    The markdown holds the context, the table of means with intervals (then one column per
    comparison and metric), and every run's scores.

    Args:
        results: ``{row: {metric: MeanInterval over seeds}}``.
        per_run: ``{run: {metric: score}}``.
        runs: ``{row: its runs, in seed order}``.
        output: Folder to write to.
        context: What the numbers depend on.
        comparisons: ``{against: {row: {metric: paired change}}}`` (``_paired_changes``).

    """
    comparisons = comparisons or {}
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
    for name, scores in per_run.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.4f}" for m in metrics) + " |")
    markdown, data = output / "ablation.md", output / "ablation.json"
    markdown.write_text("\n".join(lines) + "\n")
    summary = {
        row: {
            metric: {
                **asdict(value),
                "values": [per_run[run][metric] for run in runs[row]],
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
    data.write_text(json.dumps({"results": summary, "runs": per_run, "context": context}, indent=2))
    return markdown, data


def _paired_changes(
    per_run: dict[str, dict[str, float]], runs: dict[str, list[str]], against: str
) -> dict[str, dict[str, MeanInterval]]:
    """Every other row's change from row ``against``, paired seed by seed, with its interval.

    A row scored once (the starting backbone, which does not depend on the training seed) is
    paired with every seed; otherwise run ``i`` of a row is paired with run ``i`` of
    ``against`` (the same seed: the same crops and data order).
    """
    base = runs[against]
    changes = {}
    for row, names in runs.items():
        if row in (against, BASELINE):
            continue
        paired = base * len(names) if len(base) == 1 else base
        changes[row] = {
            metric: paired_change(
                [per_run[run][metric] for run in paired],
                [per_run[run][metric] for run in names],
            )
            for metric in per_run[names[0]]
        }
    return changes


def plot(
    results: dict[str, dict[str, MeanInterval]],
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
        if BASELINE in results:
            axis.axhline(
                results[BASELINE][metric].mean, color="grey", linestyle="--", label=BASELINE
            )
            axis.legend(fontsize=8)
        axis.set_ylabel(metric)
        low = min(m - e for m, e in zip(means, errors, strict=True))
        high = max(m + e for m, e in zip(means, errors, strict=True))
        if BASELINE in results:
            low = min(low, results[BASELINE][metric].mean)
            high = max(high, results[BASELINE][metric].mean)
        margin = 0.15 * (high - low) + 0.005
        axis.set_ylim(low - margin, high + margin)
    count = max(cell.count for row in results.values() for cell in row.values())
    figure.suptitle(f"ablation: {title} (mean and 95% interval over {count} seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
