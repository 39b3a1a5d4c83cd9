"""``neco testbed-backbone``: pretrain the testbed backbone from scratch (VICReg(L)).

The defaults reproduce the shipped ``neco_loss/assets/testbed_vit.pt`` (``neco_loss.testbed``
holds its architecture and objective; docs/evaluation.md how it was made).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from neco_loss import assets
from neco_loss.data import NeCoMultiCrop, SyntheticScenes
from neco_loss.models import DenseViT
from neco_loss.progress import progress_bar
from neco_loss.schedules import cosine
from neco_loss.testbed import (
    DROP_PATH_RATE,
    IMAGE_SIZE,
    SHIPPED_NAME,
    expander,
    testbed_vit,
    vicregl_loss,
)

NAME = "testbed-backbone"
HELP = (
    "pretrain the testbed backbone from scratch (VICReg with VICRegL's local term on "
    "SyntheticScenes); the defaults reproduce the shipped neco_loss/assets/testbed_vit.pt"
)


@dataclass
class PretrainSettings:
    """How the testbed backbone is made (the defaults made the shipped file).

    Attributes:
        steps: Optimisation steps (batch ``batch_size``).
        batch_size: Images per step.
        lr: Peak AdamW learning rate, cosine to 0.
        weight_decay: AdamW weight decay.
        local_weight: Weight of the patch-token (VICRegL local) term.
        train_images: Distinct ``SyntheticScenes`` training images.
        seed: Seed of initialisation, data and augmentations.

    """

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    local_weight: float = 1.0
    train_images: int = 8192
    seed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output``, ``--steps``, ``--seed``, ``--quiet``."""
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/testbed"), help="weights and log go here"
    )
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps, help="steps")
    parser.add_argument("--seed", type=int, default=PretrainSettings.seed, help="seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Pretrain; print where the weights and the log went."""
    settings = PretrainSettings(steps=args.steps, seed=args.seed)
    weights = pretrain_testbed(args.output, settings, progress=not args.quiet)
    print(f"testbed backbone written to {weights} (log: {weights.parent / 'pretrain_log.json'})")


def _loader(transform: NeCoMultiCrop, settings: PretrainSettings) -> DataLoader:
    """Seeded multi-crop batches of ``settings.train_images`` training scenes."""
    from neco_loss.data.feeding import MultiCropDataset

    # The demo's crops (tiny_cpu.yaml), drawn once per image (seeded by its index): 8192
    # images give the variety, not redrawn crops.
    images = SyntheticScenes("train", IMAGE_SIZE, settings.train_images, seed=settings.seed)
    return DataLoader(
        MultiCropDataset(images, transform, settings.seed),
        batch_size=settings.batch_size,
        shuffle=True,  # the order of each epoch drawn from the seeded global generator
        drop_last=True,
        num_workers=1,  # draws crops while the main process trains
        persistent_workers=True,
    )


def pretrain_testbed(
    output: Path, settings: PretrainSettings | None = None, progress: bool = True
) -> Path:
    """Pretrain the testbed backbone from scratch; write it (float16) and its training log.

    Args:
        output: Folder for ``testbed_vit.pt`` and ``pretrain_log.json``.
        settings: ``PretrainSettings`` (defaults: the shipped file's).
        progress: Show a progress bar.

    Returns:
        The path of the written weights.

    """
    from lightly.loss import VICRegLoss

    settings = settings or PretrainSettings()
    torch.manual_seed(settings.seed)
    backbone = testbed_vit(drop_path_rate=DROP_PATH_RATE).train()
    expanders = (expander(backbone.embed_dim), expander(backbone.embed_dim))
    optimizer = torch.optim.AdamW(
        nn.ModuleList([backbone, *expanders]).parameters(),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    # Two 64 px global and four 32 px local views, as the demo's NeCo run.
    transform = NeCoMultiCrop(global_size=64, local_size=32)
    loader, criterion = _loader(transform, settings), VICRegLoss()
    losses: list[float] = []
    start = time.perf_counter()
    bar = progress_bar(total=settings.steps, desc="testbed pretraining", enabled=progress)
    while len(losses) < settings.steps:
        for views, boxes in loader:
            if len(losses) == settings.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = cosine(len(losses), settings.steps, settings.lr, 0.0)
            loss = vicregl_loss(
                criterion,
                _maps(backbone, views, transform.num_global),
                boxes,
                [(view.shape[2], view.shape[3]) for view in views],
                backbone.patch_size,
                expanders,
                transform.num_global,
                settings.local_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return _write(backbone, output, settings, losses, time.perf_counter() - start)


def _maps(backbone: nn.Module, views: list[torch.Tensor], num_global: int) -> list[torch.Tensor]:
    """Patch maps of every view: the global views in one forward, the local ones in another."""
    return [
        *backbone(torch.cat(views[:num_global])).chunk(num_global),
        *backbone(torch.cat(views[num_global:])).chunk(len(views) - num_global),
    ]


def _write(
    backbone: DenseViT,
    output: Path,
    settings: PretrainSettings,
    losses: list[float],
    seconds: float,
) -> Path:
    """Write the float16 weights and ``pretrain_log.json``; the weights' path."""
    output.mkdir(parents=True, exist_ok=True)
    weights = output / assets.SHIPPED[SHIPPED_NAME][0]
    state = {key: value.half() for key, value in backbone.vit.state_dict().items()}
    torch.save(state, weights)
    log = {
        "settings": asdict(settings),
        "seconds": seconds,
        "losses_every_100": losses[::100],
        "sha256": assets.file_sha256(weights),
    }
    (output / "pretrain_log.json").write_text(json.dumps(log, indent=2))
    return weights
