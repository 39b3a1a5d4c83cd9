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

``neco testbed-backbone`` (``neco_loss.app.testbed_backbone``) reproduces the shipped file
``neco_loss/assets/testbed_vit.pt`` (float16 state dict, its SHA-256 in
``neco_loss.assets.SHIPPED``); ``testbed_backbone()``, or ``weights: testbed`` in a training
config, loads it. This module holds the architecture and the objective; the command holds the
training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neco_loss.geometry import align_checked_pair, crop_extent
from neco_loss.models import DenseViT

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


def expander(embed_dim: int) -> nn.Sequential:
    """VICReg's expander MLP: ``embed_dim`` to ``EXPANDER_DIM`` (paper: three layers of 8192)."""
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
    roi_size: int = ROI_SIZE,
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
        roi_size: Side of the aligned token grid of a pair (the testbed's: 4).

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
                maps[first], maps[second], boxes[:, first], boxes[:, second], roi_size, extents
            )
            tokens[0].append(a[valid].flatten(0, 1))
            tokens[1].append(b[valid].flatten(0, 1))
    local = criterion(local_expander(torch.cat(tokens[0])), local_expander(torch.cat(tokens[1])))
    return loss + local_weight * local
