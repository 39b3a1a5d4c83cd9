"""One experiment runner: train a list of variants, score each with the evaluation suite.

``neco ablate`` runs it over the variants of an ablation file, ``neco demo`` over a NeCo run
and its ``continued`` control from the testbed backbone. Every ``(variant, seed)`` trains into
its own folder (a finished one is reused, an interrupted one continued, through
``training.launch``); then the starting backbone (``baseline``), every run's student and, for
the ``teachers`` variants, its EMA teacher are scored by ``evaluation.suite.evaluate`` side by
side, each seed on its own images (so that intervals over seeds hold the evaluation's noise as
well as the training's).
``experiment_report`` turns the scores into rows with intervals, paired changes and a plot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neco_loss.evaluation.datasets import IGNORE_INDEX, dataset_classes
from neco_loss.evaluation.linear import EPOCHS
from neco_loss.evaluation.suite import PER_IMAGE_FILE, evaluate, evaluation_splits
from neco_loss.models import DenseViT
from neco_loss.training import TrainConfig
from neco_loss.training.distributed import launch
from neco_loss.training.run_folder import LAST, teacher_backbone_state
from neco_loss.training.step_costs import read_costs

BASELINE = "start (no NeCo)"
TEACHER = "EMA teacher"


@dataclass
class Scoring:
    """How the backbones of an experiment are scored (``neco ablate``'s ``evaluation`` keys).

    Every seed scores its own images: the ``SyntheticScenes`` of that seed, or a random subset
    of a real dataset drawn with it, and trains its linear probe with it.

    Attributes:
        dataset: ``synthetic`` or a dataset of ``evaluation.datasets`` (then ``data_root``).
        data_root: The dataset's folder.
        image_size: Side of the scored images; ``None``: the runs' ``image_size`` for
            ``synthetic``, 448 px (paper) otherwise.
        train_images: Memory bank / linear probe training images (0: all).
        val_images: Scored images (0: all).
        split: The split scored (``val`` or, for ``SyntheticScenes``, ``test``).
        linear_epochs: Epochs of the linear probe.
        protocols: Protocols of ``evaluation.suite.PROTOCOLS``.

    """

    dataset: str = "synthetic"
    data_root: str | None = None
    image_size: int | None = None
    train_images: int = 200
    val_images: int = 128
    split: str = "val"
    linear_epochs: int = EPOCHS
    protocols: list[str] = field(default_factory=lambda: ["in-context", "linear"])


@dataclass
class Experiment:
    """Runs to train and what to score.

    Attributes:
        runs: ``{(variant, seed): config}``, each with its own ``output_dir``.
        scoring: How every backbone is scored.
        baseline: Also score the starting backbone (the runs' ``weights``) as row ``BASELINE``,
            on every seed's images.
        teachers: The variants whose runs' EMA teachers are also scored, as rows
            ``"<variant> EMA teacher"``.

    """

    runs: dict[tuple[str, int], TrainConfig]
    scoring: Scoring
    baseline: bool = False
    teachers: tuple[str, ...] = ()


@dataclass
class ExperimentScores:
    """The scores of an experiment's backbones.

    Attributes:
        per_run: ``{run: {metric: score}}``, runs named ``"<row> (seed N)"``.
        rows: ``{row: its runs in seed order}``; the baseline first when scored.
        per_class: ``{run: {protocol: per-class IoU}}`` (``results.json`` of each seed).
        per_image: ``{run: {metric: (N, 3, C) pixel counts of its seed's scored images}}``.
        costs: ``{run: costs.json of its training run}`` (trained runs that wrote one).
        image_size: Side of the scored images.
        train_images: Memory bank / probe training images per seed.
        val_images: Images scored per seed.

    """

    per_run: dict[str, dict[str, float]]
    rows: dict[str, list[str]]
    per_class: dict[str, dict[str, list[float]]]
    per_image: dict[str, dict[str, Tensor]]
    costs: dict[str, dict[str, Any]]
    image_size: int
    train_images: int
    val_images: int


def run_name(row: str, seed: int) -> str:
    """The name of one seed's run of ``row`` in tables and figures."""
    return f"{row} (seed {seed})"


def run_experiment(experiment: Experiment, output: Path, progress: bool = True) -> ExperimentScores:
    """Train every run, then score each seed's backbones side by side on that seed's images.

    Seed by seed: its runs are trained (or reused), then the starting backbone (with
    ``baseline``), the runs' students and (with ``teachers``) EMA teachers are scored by
    ``evaluation.suite.evaluate`` on the seed's own images, into ``output/evaluation/seed<N>``.

    Args:
        experiment: The runs and the scoring.
        output: The suite's tables and pictures go to ``output/evaluation/seed<N>``.
        progress: Show progress bars.

    Returns:
        The scores, by run and by row.

    Raises:
        ValueError: If ``baseline`` is asked for but the runs start from no ``weights``.

    """
    first = next(iter(experiment.runs.values()))
    scoring = experiment.scoring
    size = scoring.image_size or (first.image_size if scoring.dataset == "synthetic" else 448)
    start = _frozen(_starting_backbone(first)) if experiment.baseline else None
    scores = ExperimentScores({}, {}, {}, {}, {}, size, 0, 0)
    for seed in sorted({seed for _, seed in experiment.runs}):
        rows: dict[str, Callable[[Tensor], Tensor]] = {}  # this seed's backbones by row
        if start is not None:
            rows[BASELINE] = start
        for (variant, run_seed), config in experiment.runs.items():
            if run_seed != seed:
                continue
            print(f"== variant {variant}, seed {seed}")
            teacher = variant in experiment.teachers
            for row, backbone in _train(config, teacher, variant, progress).items():
                rows[row] = _frozen(backbone)
            costs = read_costs(config.output_dir_path)
            if costs is not None:
                scores.costs[run_name(variant, seed)] = costs
        for row in rows:
            scores.rows.setdefault(row, []).append(run_name(row, seed))
        backbones = {run_name(row, seed): backbone for row, backbone in rows.items()}
        folder = output / "evaluation" / f"seed{seed}"
        _score_seed(scores, backbones, scoring, seed, folder, progress)
    return scores


def _score_seed(
    scores: ExperimentScores,
    backbones: dict[str, Callable[[Tensor], Tensor]],
    scoring: Scoring,
    seed: int,
    folder: Path,
    progress: bool = True,
) -> None:
    """Score one seed's backbones on its own images; add them to ``scores``."""
    train_set, val_set = evaluation_splits(
        scoring.dataset,
        scoring.data_root,
        scores.image_size,
        scoring.train_images,
        scoring.val_images,
        val_split=scoring.split,
        seed=seed,
        shuffle=True,
    )
    classes, class_names = dataset_classes(scoring.dataset, scoring.data_root)
    scores.per_run.update(
        evaluate(
            backbones,
            train_set,
            val_set,
            classes,
            scoring.protocols,
            folder,
            ignore_index=IGNORE_INDEX,
            linear_epochs=scoring.linear_epochs,
            progress=progress,
            class_names=class_names,
            seed=seed,
        )
    )
    scores.per_class.update(json.loads((folder / "results.json").read_text())["per_class"])
    scores.per_image.update(torch.load(folder / PER_IMAGE_FILE, weights_only=True))
    scores.train_images, scores.val_images = len(train_set), len(val_set)


def _starting_backbone(config: TrainConfig) -> DenseViT:
    """The backbone the runs start from (their ``weights``).

    Raises:
        ValueError: If the runs start from no weights file.

    """
    if config.weights is None:
        raise ValueError(
            "'baseline: true' scores the starting backbone, but the base config has no "
            "'weights' (the backbone NeCo starts from)."
        )
    return DenseViT(config.model, checkpoint=config.weights, **config.model_kwargs)


def _train(
    config: TrainConfig, teachers: bool, variant: str, progress: bool
) -> dict[str, DenseViT]:
    """Train one run (continued or reused if its folder has a checkpoint); its backbones.

    Returns:
        ``{variant: student}``, plus ``{"<variant> EMA teacher": teacher}`` with ``teachers``.

    """
    # A run trained before (an interrupted or repeated experiment) is continued, or reused
    # when it finished; one whose settings changed is refused by resume.
    resume = (config.output_dir_path / LAST).exists()
    result = launch(config, resume=resume, progress=progress)
    trained = {variant: DenseViT(config.model, checkpoint=result.backbone, **config.model_kwargs)}
    if teachers:
        teacher = DenseViT(config.model, **config.model_kwargs)
        teacher.vit.load_state_dict(teacher_backbone_state(result.checkpoint))
        trained[f"{variant} {TEACHER}"] = teacher
    return trained


def _frozen(backbone: DenseViT) -> Callable[[Tensor], Tensor]:
    """``backbone`` in eval mode as a no-grad feature function."""
    return torch.no_grad()(backbone.eval())


def scores_of(scores: ExperimentScores, row: str) -> list[dict[str, Any]]:
    """Every run of ``row``: its metrics, in seed order."""
    return [scores.per_run[run] for run in scores.rows[row]]
