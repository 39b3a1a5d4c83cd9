"""The main job on an embedded default: measure whether NeCo improves patch features.

``neco demo`` (``make demo``) on CPU, without downloads: the shipped testbed backbone (a small
ViT pretrained on ``SyntheticScenes`` with VICReg(L), ``neco_loss.testbed``) is scored by the
in-context and linear segmentation protocols, post-pretrained with NeCo, and scored again.
Prints ``in-context mIoU: before X -> after Y`` and writes a figure, the results and the
checkpoint under the output folder. ``--seed N`` changes NeCo's randomness (head
initialisation, crops, data order, reference draws) and the scored images, so seeds give
independent before/after pairs (docs/training.md has the table over seeds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neco_loss.data import SyntheticScenes
from neco_loss.evaluation import InContextResult, in_context_miou
from neco_loss.evaluation.datasets import Normalized
from neco_loss.evaluation.in_context import FeatureFn
from neco_loss.evaluation.linear import linear_segmentation_miou
from neco_loss.models import DenseEncoder, DenseViT
from neco_loss.testbed import TESTBED_MODEL, TESTBED_MODEL_KWARGS, testbed_backbone
from neco_loss.training import Trainer, build_config

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


def evaluation_sets(
    image_size: int, seed: int, split: str = REPORTED_SPLIT
) -> tuple[Normalized, Normalized]:
    """The memory bank / probe training images and the scored images of seed ``seed``."""
    return (
        Normalized(SyntheticScenes("train", image_size, EVAL_TRAIN_IMAGES, seed=seed)),
        Normalized(SyntheticScenes(split, image_size, EVAL_IMAGES, seed=seed)),
    )


@contextmanager
def frozen_features(backbone: DenseViT) -> Iterator[FeatureFn]:
    """``backbone`` as a no-grad feature function in eval mode; its mode is restored after."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    try:
        yield torch.no_grad()(lambda images: backbone(images.to(device)))
    finally:
        backbone.train(was_training)


def evaluate(
    backbone: DenseViT, sets: tuple[Normalized, Normalized], keep: int = 0
) -> InContextResult:
    """In-context result of ``backbone`` on ``evaluation_sets`` (memory, scored images)."""
    with frozen_features(backbone) as features:
        return in_context_miou(features, *sets, SyntheticScenes.num_classes, keep_predictions=keep)


def evaluate_linear(backbone: DenseViT, sets: tuple[Normalized, Normalized], seed: int) -> float:
    """Linear-probe mIoU of ``backbone`` on ``evaluation_sets`` (probe training, scored)."""
    with frozen_features(backbone) as features:
        return linear_segmentation_miou(
            features, *sets, SyntheticScenes.num_classes, epochs=LINEAR_EPOCHS, seed=seed
        ).miou


def draw(
    before: InContextResult,
    after: InContextResult,
    image_size: int,
    seed: int,
    split: str,
    path: Path,
) -> None:
    """Rows: scored image, ground truth, prediction before and after NeCo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neco_loss.data import CLASS_NAMES

    scenes = SyntheticScenes(split, image_size, EVAL_IMAGES, seed=seed)
    count = len(before.predictions)
    figure, axes = plt.subplots(4, count, figsize=(1.8 * count, 7.6))
    colours = plt.get_cmap("tab10", len(CLASS_NAMES))
    titles = ("image", "ground truth", f"before ({before.miou:.3f})", f"after ({after.miou:.3f})")
    for column in range(count):
        image, mask = scenes[column]
        panels = (
            image.permute(1, 2, 0),
            mask,
            before.predictions[column],
            after.predictions[column],
        )
        for row, panel in enumerate(panels):
            axis = axes[row, column]
            if row == 0:
                axis.imshow(panel.numpy())
            else:
                axis.imshow(panel.numpy(), cmap=colours, vmin=0, vmax=len(CLASS_NAMES) - 1)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(titles[row])
    figure.suptitle(f"In-context segmentation of SyntheticScenes ({split}), mIoU in brackets")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_demo(
    output: Path,
    seed: int = 0,
    neco_steps: int | None = None,
    progress: bool = True,
    split: str = REPORTED_SPLIT,
) -> DemoResult:
    """Score the testbed backbone, post-pretrain it with NeCo, score it again.

    Args:
        output: Folder for ``start_backbone.pt``, ``neco/`` (the run), ``results.json`` and
            ``in_context.png``.
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
    start_path = output / START_FILE
    torch.save(backbone.vit.state_dict(), start_path)
    print(
        f"1. the testbed backbone ({sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M "
        f"parameters, pretrained with VICReg(L) on SyntheticScenes), scored on {EVAL_IMAGES} "
        f"{split} images"
    )
    sets = evaluation_sets(config.image_size, seed, split)
    before = evaluate(backbone, sets, keep=6)
    linear_before = evaluate_linear(backbone, sets, seed)
    print(f"   in-context mIoU {before.miou:.4f}, linear mIoU {linear_before:.4f}")
    print(f"2. NeCo post-pretraining for {config.max_steps} steps")
    trainer = Trainer(config, progress=progress)
    trainer.fit()
    student = trainer.student.backbone
    after = evaluate(student, sets, keep=6)
    linear_after = evaluate_linear(student, sets, seed)
    teacher: DenseEncoder = trainer.teacher.module  # type: ignore[assignment]
    after_teacher = evaluate(teacher.backbone, sets)
    result = DemoResult(
        seed,
        split,
        before.miou,
        after.miou,
        after_teacher.miou,
        linear_before,
        linear_after,
        before.iou.tolist(),
        after.iou.tolist(),
        int(config.max_steps or 0),
        time.perf_counter() - start,
    )
    (output / "results.json").write_text(json.dumps(asdict(result), indent=2))
    figure = output / "in_context.png"
    draw(before, after, config.image_size, seed, split, figure)
    print(
        f"in-context mIoU: before {before.miou:.4f} -> after {after.miou:.4f} "
        f"(EMA teacher {after_teacher.miou:.4f}); linear mIoU: before {linear_before:.4f} -> "
        f"after {linear_after:.4f}"
    )
    print(
        f"   figure {figure}, checkpoint {trainer.output_dir / 'checkpoint_last.pt'}, "
        f"{result.seconds / 60:.1f} min"
    )
    return result


def run_demo_seeds(
    output: Path, seeds: list[int], progress: bool = True, split: str = REPORTED_SPLIT
) -> str:
    """``run_demo`` for every seed, then the per-seed table and the paired 95% intervals.

    Each seed runs into ``output/seed<N>``; one whose ``results.json`` exists already is read,
    not run again. The table and the mean changes are written to ``output/seeds.md``.

    Returns:
        The markdown of ``seeds.md``.

    """
    from neco_loss.statistics import paired_change

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
