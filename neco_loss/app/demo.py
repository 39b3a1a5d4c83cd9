"""``neco demo``: the main job on an embedded default, whether NeCo improves patch features.

On CPU, without downloads: the shipped testbed backbone (a small ViT pretrained on
``SyntheticScenes`` with VICReg(L), ``neco_loss.testbed``) is post-pretrained with NeCo, then
the starting backbone, the NeCo student and its EMA teacher are scored side by side by the
in-context and linear segmentation protocols: a two-row experiment (start, NeCo) of the
experiment runner (``neco_loss.app.experiment``). Prints ``in-context mIoU: before X -> after
Y`` and writes ``results.json``, the figure ``in_context.png`` (the suite's in-context figure),
the suite's tables and pictures (``evaluation/``) and the run (``neco/``) under the output
folder. ``--seed N`` changes NeCo's randomness (head initialisation, crops, data order,
reference draws) and the scored images, so seeds give independent before/after pairs
(docs/training.md has the table over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
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
from neco_loss.training import build_config

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
    "lr_backbone": 3e-4,  # chosen on the val split (docs/training.md)
    "lr_head": 1e-3,
    "momentum": 0.99,
    "loss": {"roi_size": 4},
    "weights": "testbed",  # the shipped testbed backbone (neco_loss.assets)
}
EVAL_TRAIN_IMAGES = 200  # memory bank / linear probe training images
EVAL_IMAGES = 64  # scored images
REPORTED_SPLIT = "test"  # settings were chosen on "val" (docs/training.md)
LINEAR_EPOCHS = 10
START_FILE = "start_backbone.pt"
NECO = "NeCo"  # the experiment's trained row


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
    iou_before: list[float]
    iou_after: list[float]
    neco_steps: int
    seconds: float


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
    """Post-pretrain the testbed backbone with NeCo; score the start and the result.

    Args:
        output: Folder for ``start_backbone.pt``, ``neco/`` (the run), ``evaluation/``,
            ``results.json`` and ``in_context.png``.
        seed: Seed of NeCo's randomness and of the scored images.
        neco_steps: NeCo steps (``None``: ``DEMO_CONFIG``'s 300).
        progress: Show progress bars.
        split: ``SyntheticScenes`` split to score: ``"test"`` (reported) or ``"val"`` (for
            choosing settings).

    Returns:
        The ``DemoResult``, also written to ``results.json``.

    """
    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    config = build_config({**DEMO_CONFIG, "seed": seed, "output_dir": str(output / "neco")})
    if neco_steps is not None:
        config.max_steps = neco_steps
    backbone = testbed_backbone().float()
    torch.save(backbone.vit.state_dict(), output / START_FILE)  # for neco eval --checkpoint
    print(
        f"1. NeCo post-pretraining of the testbed backbone ("
        f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M parameters, pretrained "
        f"with VICReg(L) on SyntheticScenes) for {config.max_steps} steps"
    )
    scoring = Scoring(
        train_images=EVAL_TRAIN_IMAGES,
        val_images=EVAL_IMAGES,
        split=split,
        linear_epochs=LINEAR_EPOCHS,
        seed=seed,
    )
    experiment = Experiment({(NECO, seed): config}, scoring, baseline=True, teachers=True)
    scores = run_experiment(experiment, output, progress)
    print(f"2. scored on {EVAL_IMAGES} {split} images: the start, the student, the EMA teacher")
    result = _demo_result(scores, seed, split, int(config.max_steps or 0))
    result.seconds = time.perf_counter() - start
    (output / "results.json").write_text(json.dumps(asdict(result), indent=2))
    figure = output / "in_context.png"
    shutil.copyfile(output / "evaluation" / "in-context.png", figure)
    print(
        f"in-context mIoU: before {result.miou_before:.4f} -> after {result.miou_after:.4f} "
        f"(EMA teacher {result.miou_after_teacher:.4f}); linear mIoU: before "
        f"{result.linear_before:.4f} -> after {result.linear_after:.4f}"
    )
    print(
        f"   figure {figure}, checkpoint {config.output_dir_path / 'checkpoint_last.pt'}, "
        f"{result.seconds / 60:.1f} min"
    )
    return result


def _demo_result(scores: ExperimentScores, seed: int, split: str, steps: int) -> DemoResult:
    """The demo's numbers from the experiment's rows (``seconds`` left at 0)."""
    student, teacher = run_name(NECO, seed), run_name(f"{NECO} {TEACHER}", seed)
    before, after = scores.per_run[BASELINE], scores.per_run[student]
    return DemoResult(
        seed,
        split,
        before["in-context mIoU"],
        after["in-context mIoU"],
        scores.per_run[teacher]["in-context mIoU"],
        before["linear mIoU"],
        after["linear mIoU"],
        scores.per_class[BASELINE]["in-context"],
        scores.per_class[student]["in-context"],
        steps,
        0.0,
    )


def run_demo_seeds(
    output: Path, seeds: list[int], progress: bool = True, split: str = REPORTED_SPLIT
) -> str:
    """``run_demo`` for every seed, then the per-seed table and the paired 95% intervals.

    Each seed runs into ``output/seed<N>``; one whose ``results.json`` exists already is read,
    not run again. The table and the mean changes are written to ``output/seeds.md``.

    Returns:
        The markdown of ``seeds.md``.

    """
    from neco_loss.app.statistics import paired_change

    results = []
    for seed in seeds:
        folder = output / f"seed{seed}"
        if (folder / "results.json").is_file():
            results.append(DemoResult(**json.loads((folder / "results.json").read_text())))
        else:
            results.append(run_demo(folder, seed, progress=progress, split=split))
    lines = [
        "| seed | in-context before | in-context after (student) | EMA teacher | "
        "linear before | linear after |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result.seed} | {result.miou_before:.4f} | {result.miou_after:.4f} | "
            f"{result.miou_after_teacher:.4f} | {result.linear_before:.4f} | "
            f"{result.linear_after:.4f} |"
        )
    changes = {
        "in-context": paired_change(
            [r.miou_before for r in results], [r.miou_after for r in results]
        ),
        "in-context, EMA teacher": paired_change(
            [r.miou_before for r in results], [r.miou_after_teacher for r in results]
        ),
        "linear": paired_change(
            [r.linear_before for r in results], [r.linear_after for r in results]
        ),
    }
    lines.append("")
    for name, change in changes.items():
        verdict = "excludes 0" if change.excludes_zero() else "includes 0"
        interval = (
            f"[{change.low:+.4f}, {change.high:+.4f}] ({verdict})"
            if change.low is not None and change.high is not None
            else "(one seed: no interval)"
        )
        lines.append(
            f"- {name} mIoU change through NeCo: {change.mean:+.4f}, paired 95% interval "
            f"{interval}, {change.count} seeds, {split} split"
        )
    table = "\n".join(lines) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    (output / "seeds.md").write_text(table)
    return table
