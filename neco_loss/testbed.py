"""The testbed backbone: a small ViT pretrained on ``SyntheticScenes``, shipped in the package.

NeCo *post*-pretrains a backbone whose patch features already carry semantics (the paper starts
from DINO, DINOv2, DINOv2-R). No such backbone can be downloaded here, so the project makes one:
the demo's ViT (DINOv2-registers architecture shrunk for 2 CPU cores: 8 px patches, width 96,
depth 4) pretrained with VICReg (Bardes et al., ICLR 2022) plus the location-matched local term
of VICRegL (Bardes et al., NeurIPS 2022): lightly's ``VICRegLoss`` between the pooled embedding
of view 0 and that of every other view, and between the ROI-aligned patch tokens of every global
view and every later view (``vicregl_loss``). The local term is what makes the patch tokens (not
only their mean) invariant to colour jitter and crops, so that they encode the texture and shape
that identify a class.

``neco testbed-backbone`` reproduces the shipped file ``neco_loss/assets/testbed_vit.pt``
(float16 state dict, its SHA-256 in ``neco_loss.assets.SHIPPED``); ``testbed_backbone()``, or
``weights: testbed`` in a training config, loads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from neco_loss import assets
from neco_loss.data import NeCoMultiCrop, SyntheticScenes
from neco_loss.geometry import align_checked_pair, crop_extent
from neco_loss.models import DenseViT
from neco_loss.progress import progress_bar
from neco_loss.schedules import cosine

SHIPPED_NAME = "testbed"  # neco_loss.assets.SHIPPED: weights: testbed
# The demo's ViT: a DINOv2-registers ViT-S architecture shrunk for 2 CPU cores.
TESTBED_MODEL = "vit_small_patch14_reg4_dinov2"
TESTBED_MODEL_KWARGS: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
}
IMAGE_SIZE = 96  # SyntheticScenes side; 12 x 12 patches at evaluation
EXPANDER_DIM = 512  # VICReg's expander, scaled down with the model (paper: 8192)
ROI_SIZE = 4  # aligned tokens per pair: 4 x 4, as the demo's NeCo loss
DROP_PATH_RATE = 0.1  # as TrainConfig's default (reference config)


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


def testbed_vit(checkpoint: str | Path | None = None, drop_path_rate: float = 0.0) -> DenseViT:
    """The testbed architecture, randomly initialised or with weights from ``checkpoint``."""
    return DenseViT(
        TESTBED_MODEL,
        checkpoint=checkpoint,
        drop_path_rate=drop_path_rate,
        **TESTBED_MODEL_KWARGS,
    )


def testbed_backbone() -> DenseViT:
    """The shipped pretrained testbed backbone (eval mode), its checksum verified.

    Raises:
        ValueError: If the shipped file does not match its SHA-256 (damaged or replaced).

    """
    return testbed_vit(SHIPPED_NAME).eval()


def _expander(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dim, EXPANDER_DIM),
        nn.BatchNorm1d(EXPANDER_DIM),
        nn.ReLU(),
        nn.Linear(EXPANDER_DIM, EXPANDER_DIM),
    )


def vicregl_loss(
    criterion: nn.Module,
    maps: list[Tensor],
    boxes: Tensor,
    crop_sizes: list[tuple[int, int]],
    patch_size: int,
    expanders: tuple[nn.Module, nn.Module],
    num_global: int,
    local_weight: float,
) -> Tensor:
    """VICReg(L): pooled embeddings and ROI-aligned patch tokens of pairs of views.

    The global term pairs view 0 with every other view (VICReg on the mean patch token); the
    local term pairs every global view with every later view on their shared region (VICRegL's
    location-based matching of global-global and global-local pairs, on our ROI alignment).

    Args:
        criterion: lightly's ``VICRegLoss``.
        maps: Per view ``(B, D, h, w)`` patch maps, global views first.
        boxes: ``(B, V, 5)`` crop boxes in original-image pixels.
        crop_sizes: Per view ``(height, width)`` in pixels.
        patch_size: The ViT's patch side in pixels.
        expanders: ``(pooled embedding expander, patch token expander)``.
        num_global: Number of global views.
        local_weight: Weight of the token term.

    Returns:
        The scalar loss.

    """
    global_expander, local_expander = expanders
    pooled = [global_expander(feature_map.mean(dim=(2, 3))) for feature_map in maps]
    loss = sum(criterion(pooled[0], other) for other in pooled[1:]) / (len(maps) - 1)
    tokens: tuple[list[Tensor], list[Tensor]] = ([], [])
    for first in range(num_global):
        for second in range(first + 1, len(maps)):
            extents = (
                crop_extent(crop_sizes[first], patch_size),
                crop_extent(crop_sizes[second], patch_size),
            )
            a, b, valid = align_checked_pair(
                maps[first], maps[second], boxes[:, first], boxes[:, second], ROI_SIZE, extents
            )
            tokens[0].append(a[valid].flatten(0, 1))
            tokens[1].append(b[valid].flatten(0, 1))
    local = criterion(local_expander(torch.cat(tokens[0])), local_expander(torch.cat(tokens[1])))
    return loss + local_weight * local


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

    from neco_loss.data.feeding import MultiCropDataset

    settings = settings or PretrainSettings()
    torch.manual_seed(settings.seed)
    backbone = testbed_vit(drop_path_rate=DROP_PATH_RATE).train()
    expanders = (_expander(backbone.embed_dim), _expander(backbone.embed_dim))
    modules = nn.ModuleList([backbone, *expanders])
    optimizer = torch.optim.AdamW(
        modules.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    # The demo's crops (tiny_cpu.yaml): two 64 px global and four 32 px local views, drawn once
    # per image (seeded by its index): 8192 images give the variety, not redrawn crops.
    transform = NeCoMultiCrop(global_size=64, local_size=32)
    images = SyntheticScenes("train", IMAGE_SIZE, settings.train_images, seed=settings.seed)
    loader = DataLoader(
        MultiCropDataset(images, transform, settings.seed),
        batch_size=settings.batch_size,
        shuffle=True,  # the order of each epoch drawn from the seeded global generator
        drop_last=True,
        num_workers=1,  # draws crops while the main process trains
        persistent_workers=True,
    )
    criterion = VICRegLoss()
    losses: list[float] = []
    start = time.perf_counter()
    bar = progress_bar(total=settings.steps, desc="testbed pretraining", enabled=progress)
    while len(losses) < settings.steps:
        for views, boxes in loader:
            step = len(losses)
            if step == settings.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = cosine(step, settings.steps, settings.lr, 0.0)
            num_global = transform.num_global
            maps = list(backbone(torch.cat(views[:num_global])).chunk(num_global))
            maps += list(backbone(torch.cat(views[num_global:])).chunk(len(views) - num_global))
            loss = vicregl_loss(
                criterion,
                maps,
                boxes,
                [(view.shape[2], view.shape[3]) for view in views],
                backbone.patch_size,
                expanders,
                num_global,
                settings.local_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    output.mkdir(parents=True, exist_ok=True)
    weights = output / assets.SHIPPED[SHIPPED_NAME][0]
    state = {key: value.half() for key, value in backbone.vit.state_dict().items()}
    torch.save(state, weights)
    log = {
        "settings": asdict(settings),
        "seconds": time.perf_counter() - start,
        "losses_every_100": losses[::100],
        "sha256": assets.file_sha256(weights),
    }
    (output / "pretrain_log.json").write_text(json.dumps(log, indent=2))
    return weights
