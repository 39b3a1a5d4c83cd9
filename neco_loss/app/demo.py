"""``neco demo``: the main job on an embedded default, whether NeCo improves patch features.

On CPU, without downloads: the shipped testbed backbone (a small ViT pretrained on
``SyntheticScenes`` with VICReg(L), ``neco_loss.testbed``) is post-pretrained with NeCo and,
as the control a user would otherwise run, with its own VICReg(L) objective for the same
steps (``objective: continued``); then the start, the NeCo student, its EMA teacher and the
control are scored side by side by the in-context and linear segmentation protocols on the
seed's own images: one experiment of the experiment runner (``neco_loss.app.experiment``).
Prints ``in-context mIoU: before X -> after Y (+Z); continued VICReg(L): +C`` and writes
``results.json``, the figure ``in_context.png`` (the suite's in-context figure), the suite's
tables and pictures (``evaluation/``) and the runs (``neco/``, ``continued/``) under the
output folder. ``--seed N`` changes the training randomness and the scored images, so seeds
give independent pairs (the measured multi-seed study: ``MULTI_SEED_TABLE``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from neco_loss.app.experiment import (
    BASELINE,
    TEACHER,
    Experiment,
    ExperimentScores,
    Scoring,
    run_experiment,
    run_name,
)
from neco_loss.testbed import TESTBED_MODEL, TESTBED_MODEL_KWARGS, testbed_backbone
from neco_loss.training import TrainConfig, build_config
from neco_loss.training.run_folder import LAST, check_resumable, load_checkpoint

NAME = "demo"
HELP = "the main job on the built-in synthetic scenes"
# The testbed ViT (a DINOv2-registers ViT-S architecture shrunk for 2 CPU cores: 8 px patches
# on 64 px crops) post-pretrained with the reference NeCo settings scaled to it.
DEMO_CONFIG: dict[str, Any] = {
    "model": TESTBED_MODEL,
    "model_kwargs": TESTBED_MODEL_KWARGS,
    "head_hidden_dim": 512,
    "head_out_dim": 128,
    "image_size": 96,
    "train_images": 512,
    "global_size": 64,
    "local_size": 32,
    "batch_size": 32,
    "epochs": 1000,
    "max_steps": 300,
    "lr_backbone": 3e-4,  # chosen on the val split (docs/ablations.md, objectives_tuning.yaml)
    "lr_head": 1e-3,
    "momentum": 0.99,
    "loss": {"roi_size": 4},
    "weights": "testbed",  # the shipped testbed backbone (neco_loss.assets)
}
# The control: the testbed's own VICReg(L) for the same steps at NeCo's lr, 3e-4; on val no lr
# from 1e-4 to 1e-3 moves it distinguishably from its start (docs/ablations.md,
# objectives_tuning.yaml).
CONTROL_CHANGES: dict[str, Any] = {"objective": "continued"}
EVAL_TRAIN_IMAGES = 200  # memory bank / linear probe training images
EVAL_IMAGES = 64  # scored images
REPORTED_SPLIT = "test"  # settings were chosen on "val" (docs/ablations.md)
START_FILE = "start_backbone.pt"
NECO = "NeCo"  # the experiment's trained rows
CONTROL = "continued VICReg(L)"
MULTI_SEED_TABLE = "docs/ablations.md#neco-side-by-side"


@dataclass
class DemoResult:
    """Numbers of one demo run (mIoU on ``split``)."""

    seed: int
    split: str
    miou_before: float
    miou_after: float
    miou_after_teacher: float
    linear_before: float
    linear_after: float
    miou_control: float
    linear_control: float
    iou_before: list[float]
    iou_after: list[float]
    neco_steps: int
    seconds: float
    version: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output``, ``--seed``, ``--neco-steps``, ``--seeds``, ``--split``."""
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and draws")
    parser.add_argument(
        "--neco-steps", type=int, default=None, help="NeCo steps (None: the recipe's max_steps)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every seed into OUTPUT/seed<N> and print the per-seed table with the paired "
        "95%% interval of the change",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="SyntheticScenes split to score (settings are chosen on val, reported on test)",
    )


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """One seed's demo, or the table over ``--seeds``."""
    if args.seeds:
        print(run_demo_seeds(args.output, args.seeds, split=args.split), end="")
    else:
        run_demo(args.output, args.seed, args.neco_steps, split=args.split)


def run_demo(
    output: Path,
    seed: int = 0,
    neco_steps: int | None = None,
    progress: bool = True,
    split: str = REPORTED_SPLIT,
) -> DemoResult:
    """Post-pretrain the testbed backbone with NeCo and with the control; score all.

    Args:
        output: Folder for ``start_backbone.pt``, ``neco/`` and ``continued/`` (the runs),
            ``evaluation/``, ``results.json`` and ``in_context.png``.
        seed: Seed of the training randomness and of the scored images.
        neco_steps: Steps of both runs (``None``: ``DEMO_CONFIG``'s 300).
        progress: Show progress bars.
        split: ``SyntheticScenes`` split to score: ``"test"`` (reported) or ``"val"`` (for
            choosing settings).

    Returns:
        The ``DemoResult``, also written to ``results.json``.

    """
    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    runs = {
        (NECO, seed): _config({"output_dir": str(output / "neco")}, seed, neco_steps),
        (CONTROL, seed): _config(
            {**CONTROL_CHANGES, "output_dir": str(output / "continued")}, seed, neco_steps
        ),
    }
    for config in runs.values():
        _clear_stale(config)
    backbone = testbed_backbone().float()
    torch.save(backbone.vit.state_dict(), output / START_FILE)  # for neco eval --checkpoint
    steps = int(runs[NECO, seed].max_steps or 0)
    print(
        f"1. post-pretraining of the testbed backbone ("
        f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M parameters, pretrained "
        f"with VICReg(L) on SyntheticScenes) for {steps} steps: with NeCo, and with its own "
        "VICReg(L) as the control"
    )
    scoring = Scoring(train_images=EVAL_TRAIN_IMAGES, val_images=EVAL_IMAGES, split=split)
    experiment = Experiment(runs, scoring, baseline=True, teachers=(NECO,))
    scores = run_experiment(experiment, output, progress)
    print(f"2. scored on {EVAL_IMAGES} {split} images: the start, NeCo, its EMA teacher, control")
    result = _demo_result(scores, seed, split, steps)
    result.seconds = time.perf_counter() - start
    (output / "results.json").write_text(json.dumps(asdict(result), indent=2))
    figure = output / "in_context.png"
    shutil.copyfile(output / "evaluation" / f"seed{seed}" / "in-context.png", figure)
    _print_result(result)
    print(f"   figure {figure}, runs in {output}, {result.seconds / 60:.1f} min")
    return result


def _print_result(result: DemoResult) -> None:
    """The changes through NeCo and through the control, and where the multi-seed table is."""
    for name, before, after, control in (
        ("in-context", result.miou_before, result.miou_after, result.miou_control),
        ("linear", result.linear_before, result.linear_after, result.linear_control),
    ):
        print(
            f"{name} mIoU: before {before:.4f} -> after {after:.4f} ({after - before:+.4f}); "
            f"{CONTROL}: {control - before:+.4f}"
        )
    print(
        f"   EMA teacher in-context {result.miou_after_teacher:.4f}; one seed, {EVAL_IMAGES} "
        f"images: the measured table over seeds is {MULTI_SEED_TABLE}"
    )


def _clear_stale(config: TrainConfig) -> None:
    """Remove a run folder left by a demo with other settings (e.g. an earlier version).

    Any other folder is continued or reused by the experiment runner; this one would be refused
    by resume, and the demo's folders hold nothing but the demo's own runs.
    """
    checkpoint = config.output_dir_path / LAST
    if not checkpoint.is_file():
        return
    state = load_checkpoint(checkpoint)
    try:
        check_resumable(state, config, int(state.get("total_steps", 0)))
        if state["config"].get("max_steps") != config.max_steps:
            raise ValueError(
                f"it ran {state['config'].get('max_steps')} steps, not {config.max_steps}."
            )
    except ValueError as error:
        print(f"   {config.output_dir_path}: {error} It is trained again.")
        shutil.rmtree(config.output_dir_path)


def _config(changes: dict[str, Any], seed: int, steps: int | None) -> TrainConfig:
    """``DEMO_CONFIG`` with ``changes`` for ``seed`` (and ``steps`` when given)."""
    config = build_config({**DEMO_CONFIG, **changes, "seed": seed})
    if steps is not None:
        config.max_steps = steps
    return config


def _demo_result(scores: ExperimentScores, seed: int, split: str, steps: int) -> DemoResult:
    """The demo's numbers from the experiment's rows (``seconds`` left at 0)."""
    start, student = run_name(BASELINE, seed), run_name(NECO, seed)
    before, after = scores.per_run[start], scores.per_run[student]
    control = scores.per_run[run_name(CONTROL, seed)]
    return DemoResult(
        seed,
        split,
        before["in-context mIoU"],
        after["in-context mIoU"],
        scores.per_run[run_name(f"{NECO} {TEACHER}", seed)]["in-context mIoU"],
        before["linear mIoU"],
        after["linear mIoU"],
        control["in-context mIoU"],
        control["linear mIoU"],
        scores.per_class[start]["in-context"],
        scores.per_class[student]["in-context"],
        steps,
        0.0,
        version("neco-loss"),
    )


def reused_result(folder: Path, split: str, steps: int) -> DemoResult | None:
    """A seed's earlier ``results.json`` if it was measured as asked, ``None`` if absent.

    Raises:
        ValueError: If it was measured on another split, for another number of steps or by
            another version of the package (or in an older format): naming what differs.

    """
    path = folder / "results.json"
    if not path.is_file():
        return None
    written = json.loads(path.read_text())
    if set(written) != {item.name for item in fields(DemoResult)}:
        raise ValueError(f"{path} is in an older format: delete {folder} to measure it again.")
    result = DemoResult(**written)
    asked = {"split": split, "neco_steps": steps, "version": version("neco-loss")}
    differs = [
        f"{key} {getattr(result, key)!r} (asked: {value!r})"
        for key, value in asked.items()
        if getattr(result, key) != value
    ]
    if differs:
        raise ValueError(
            f"{path} was measured with {', '.join(differs)}: delete {folder} (or choose another "
            "--output) to measure it again; a table never mixes the two."
        )
    return result


def run_demo_seeds(
    output: Path, seeds: list[int], progress: bool = True, split: str = REPORTED_SPLIT
) -> str:
    """``run_demo`` for every seed, then the per-seed table and the paired 95% intervals.

    Each seed runs into ``output/seed<N>``; one whose ``results.json`` exists already is read,
    not run again, if it was measured on the same split, steps and package version
    (``reused_result``). Every seed scores its own images, so the Student-t interval over
    seeds of the paired change holds training and evaluation noise. The table and the mean
    changes are written to ``output/seeds.md``.

    Returns:
        The markdown of ``seeds.md``.

    """
    steps = int(DEMO_CONFIG["max_steps"])
    results = []
    for seed in seeds:
        folder = output / f"seed{seed}"
        reused = reused_result(folder, split, steps)
        results.append(reused or run_demo(folder, seed, progress=progress, split=split))
    table = _seeds_table(results, split)
    output.mkdir(parents=True, exist_ok=True)
    (output / "seeds.md").write_text(table)
    return table


def _seeds_table(results: list[DemoResult], split: str) -> str:
    """The per-seed table and the paired changes with their intervals over seeds."""
    from neco_loss.app.statistics import seed_estimate

    lines = [
        "| seed | in-context before | NeCo (student) | EMA teacher | continued | "
        "linear before | NeCo | continued |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.seed} | {r.miou_before:.4f} | {r.miou_after:.4f} | "
            f"{r.miou_after_teacher:.4f} | {r.miou_control:.4f} | {r.linear_before:.4f} | "
            f"{r.linear_after:.4f} | {r.linear_control:.4f} |"
        )
    changes = {
        "in-context, NeCo": [r.miou_after - r.miou_before for r in results],
        "in-context, NeCo EMA teacher": [r.miou_after_teacher - r.miou_before for r in results],
        f"in-context, {CONTROL}": [r.miou_control - r.miou_before for r in results],
        "in-context, NeCo - control": [r.miou_after - r.miou_control for r in results],
        "linear, NeCo": [r.linear_after - r.linear_before for r in results],
        f"linear, {CONTROL}": [r.linear_control - r.linear_before for r in results],
        "linear, NeCo - control": [r.linear_after - r.linear_control for r in results],
    }
    lines.append("")
    for name, values in changes.items():
        estimate = seed_estimate(values, change=True)
        lines.append(
            f"- {name} (mIoU change): {estimate.format(signed=True)}, {estimate.method}, "
            f"{split} split"
        )
    return "\n".join(lines) + "\n"
