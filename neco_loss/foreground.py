"""Foreground patches from a ViT's CLS attention, for ``NeCoLoss(loss_mask=...)``.

The reference code's patch-selection ablation (``loss_mask: fg`` / ``bg``,
``experiments/configs/ablations/ablation_steepness_fg.yml`` / ``_bg.yml``) keeps the patches
that the teacher's last-layer CLS attention marks as foreground (or background).
``foreground_masks`` computes those marks as the reference code's ``process_attentions``
(``experiments/utils.py``, adapted from DINO's ``visualize_attention.py``): mean over heads,
Gaussian blur (kernel 7, sigma 0.6), keep the most attended patches holding 60% of the
attention mass, drop 8-connected components of at most 2 patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from neco_loss.checks import check_float_tensor

FOREGROUND_MASS = 0.6  # reference: process_attentions(..., threshold=0.6, blur_sigma=0.6)
BLUR_SIGMA = 0.6
BLUR_KERNEL = 7  # reference: GaussianBlur(7, sigma=blur_sigma)
SMALLEST_COMPONENT = 3  # reference: components with <= 2 patches are dropped


def foreground_masks(
    attention: Tensor, mass: float = FOREGROUND_MASS, blur_sigma: float = BLUR_SIGMA
) -> Tensor:
    """Foreground patches of each image from its CLS-to-patch attention.

    Args:
        attention: ``(B, heads, h, w)`` last-block attention of the CLS token to each patch
            (``neco_loss.models.recording_cls_attention``), or ``(B, h, w)`` already averaged.
        mass: Fraction of the (blurred) attention mass the foreground keeps (reference: 0.6).
        blur_sigma: Standard deviation of the Gaussian blur in patches (reference: 0.6).

    Returns:
        ``(B, h, w)`` bool, True on foreground patches.

    Raises:
        TypeError: If ``attention`` is not a floating tensor.
        ValueError: If it is not 3-D or 4-D, its grid is smaller than 4x4 (the blur's reflect
            padding needs 4), or ``mass`` is not in (0, 1].

    """
    check_float_tensor(attention, "attention", dims=attention.dim())
    if attention.dim() not in (3, 4) or min(attention.shape[-2:]) < BLUR_KERNEL // 2 + 1:
        raise ValueError(
            "attention must be (B, heads, h, w) or (B, h, w) with h, w >= 4 but has shape "
            f"{tuple(attention.shape)}."
        )
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1] but is {mass!r}.")
    averaged = attention.mean(dim=1) if attention.dim() == 4 else attention
    batch, height, width = averaged.shape
    blurred = gaussian_blur(averaged[:, None], [BLUR_KERNEL, BLUR_KERNEL], [blur_sigma] * 2)
    values, order = torch.sort(blurred.reshape(batch, height * width))
    share = values / values.sum(dim=-1, keepdim=True)
    kept_sorted = share.cumsum(dim=-1) > (1 - mass)
    kept = torch.empty_like(kept_sorted).scatter_(1, order, kept_sorted)  # back to patch order
    return _drop_small_components(kept.reshape(batch, height, width))


def _drop_small_components(mask: Tensor) -> Tensor:
    """``(B, h, w)`` bool without its 8-connected components of 1 or 2 patches.

    A patch lies in such a component iff it has no 8-neighbour in the mask, or exactly one
    neighbour that itself has exactly one (each other): two convolutions, no labelling pass.
    """
    ring = torch.ones(1, 1, 3, 3, dtype=torch.float32, device=mask.device)
    ring[0, 0, 1, 1] = 0
    on = mask[:, None].float()
    neighbours = F.conv2d(on, ring, padding=1) * on  # (B, 1, h, w), 0 off the mask
    single = (neighbours == 1).float()
    # For a patch with one neighbour: does that neighbour also have exactly one?
    partner_single = F.conv2d(single, ring, padding=1) * single
    small = (on == 1) & ((neighbours == 0) | (partner_single == 1))
    return mask & ~small[:, 0]
