"""The main job on an embedded default: measure whether NeCo improves patch features.

``neco demo`` (``make demo``) on CPU, without downloads: a small ViT gets a short DINO
pretraining on ``SyntheticScenes`` (NeCo post-pretrains an existing backbone; see
``dino_warmup``), its in-context segmentation mIoU is measured, it is post-pretrained with NeCo
on the same images, and measured again. Prints ``in-context mIoU: before X -> after Y`` and
writes a figure, the results and the checkpoint under the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neco_loss.data import SyntheticScenes
from neco_loss.dino_warmup import dino_warmup
from neco_loss.evaluation import InContextResult, in_context_miou
from neco_loss.evaluation.datasets import Normalized
from neco_loss.models import DenseEncoder, DenseViT
from neco_loss.training import Trainer, build_config
from neco_loss.training.trainer import build_backbone, multicrop_transform

# A ViT-S/14-registers architecture shrunk for 2 CPU cores: 8 px patches on 64 px crops.
DEMO_CONFIG: dict[str, Any] = {
    "model": "vit_small_patch14_reg4_dinov2",
    "model_kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
    "head_hidden_dim": 512,
    "head_out_dim": 128,
    "image_size": 96,
    "train_images": 512,
    "global_size": 64,
    "local_size": 32,
    "batch_size": 32,
    "epochs": 1000,
    "max_steps": 300,
    "lr_backbone": 1e-4,
    "lr_head": 1e-3,
    "momentum": 0.99,
    "loss": {"roi_size": 4},
}
DINO_STEPS = 300
EVAL_TRAIN_IMAGES = 200  # memory bank images
EVAL_VAL_IMAGES = 64


@dataclass
class DemoResult:
    """Numbers of one demo run."""

    seed: int
    miou_before: float
    miou_after: float
    miou_after_teacher: float
    iou_before: list[float]
    iou_after: list[float]
    dino_steps: int
    neco_steps: int
    seconds: float


def evaluate(backbone: DenseViT, image_size: int, seed: int, keep: int = 0) -> InContextResult:
    """In-context mIoU of ``backbone`` on ``SyntheticScenes`` (memory: train, queries: val)."""
    train_set = Normalized(SyntheticScenes("train", image_size, EVAL_TRAIN_IMAGES, seed=seed))
    val_set = Normalized(SyntheticScenes("val", image_size, EVAL_VAL_IMAGES, seed=seed))
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    result = in_context_miou(
        lambda images: backbone(images.to(device)),
        train_set,
        val_set,
        SyntheticScenes.num_classes,
        keep_predictions=keep,
    )
    backbone.train(was_training)
    return result


def draw(
    before: InContextResult, after: InContextResult, image_size: int, seed: int, path: Path
) -> None:
    """Rows: validation image, ground truth, prediction before and after NeCo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neco_loss.data import CLASS_NAMES

    scenes = SyntheticScenes("val", image_size, EVAL_VAL_IMAGES, seed=seed)
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
    figure.suptitle("In-context segmentation of SyntheticScenes (validation), mIoU in brackets")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_demo(
    output: Path,
    seed: int = 0,
    neco_steps: int | None = None,
    dino_steps: int = DINO_STEPS,
    progress: bool = True,
) -> DemoResult:
    """Warm up, evaluate, post-pretrain with NeCo, evaluate again; see the module docstring."""
    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    config = build_config({**DEMO_CONFIG, "seed": seed, "output_dir": str(output / "neco")})
    if neco_steps is not None:
        config.max_steps = neco_steps
    backbone = build_backbone(config)
    print(
        f"1. DINO warm-up of a random {sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M"
        f"-parameter ViT for {dino_steps} steps (NeCo post-pretrains a pretrained backbone)"
    )
    images = SyntheticScenes("train", config.image_size, config.train_images, seed=seed)
    transform = multicrop_transform(config)
    dino_warmup(
        backbone,
        images,
        transform,
        steps=dino_steps,
        batch_size=config.batch_size,
        seed=seed,
        progress=progress,
    )
    warm_path = output / "dino_backbone.pt"
    torch.save(backbone.vit.state_dict(), warm_path)
    before = evaluate(backbone, config.image_size, seed, keep=6)
    print(f"2. in-context mIoU after the warm-up: {before.miou:.4f}")
    print(f"3. NeCo post-pretraining for {config.max_steps} steps")
    config.weights = str(warm_path)
    trainer = Trainer(config, progress=progress)
    trainer.fit()
    after = evaluate(trainer.student.backbone, config.image_size, seed, keep=6)
    teacher: DenseEncoder = trainer.teacher.module  # type: ignore[assignment]
    after_teacher = evaluate(teacher.backbone, config.image_size, seed)
    result = DemoResult(
        seed,
        before.miou,
        after.miou,
        after_teacher.miou,
        before.iou.tolist(),
        after.iou.tolist(),
        dino_steps,
        int(config.max_steps or 0),
        time.perf_counter() - start,
    )
    (output / "results.json").write_text(json.dumps(asdict(result), indent=2))
    figure = output / "in_context.png"
    draw(before, after, config.image_size, seed, figure)
    print(
        f"in-context mIoU: before {before.miou:.4f} -> after {after.miou:.4f} "
        f"(EMA teacher {after_teacher.miou:.4f})"
    )
    print(
        f"   figure {figure}, checkpoint {trainer.output_dir / 'checkpoint_last.pt'}, "
        f"{result.seconds / 60:.1f} min"
    )
    return result
