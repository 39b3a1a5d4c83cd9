"""The checked inputs of one ``NeCoLoss`` call, as one value.

``check_loss_inputs`` validates the maps, boxes, crop sizes and foreground masks once per call
(with a fixed number of host syncs, whatever the number of views) and returns ``LossInputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from neco_loss.checks import check_choice, check_finite, check_float_tensor, compute_dtype
from neco_loss.geometry import check_boxes, crop_extent
from neco_loss.references import ReferencePolicy

LOSS_MASKS = ("all", "foreground", "background")  # reference loss_mask: all, fg, bg
# A token is selected when its ROI-aligned 0/1 mask is >= 1 (reference: aligned_mask >= 1.0),
# i.e. all its bilinear samples fall on the mask; 1 - 1e-6 absorbs the weights' rounding.
MASK_FULL = 1.0 - 1e-6


@dataclass
class LossInputs:
    """One call's inputs, checked.

    Attributes:
        student_maps: ``V`` maps ``(B, D, h_v, w_v)``, global views first.
        teacher_maps: ``C`` maps of the global views.
        boxes: ``(B, V, 4 or 5)`` crop boxes in original-image pixels.
        batch: ``B``.
        views: ``V``.
        extents: Every view's crop extent in tokens ``(height, width)``.
        selected: Per teacher view the ``(B, h_c, w_c)`` bool patches ``loss_mask`` compares,
            or ``None`` (all).

    """

    student_maps: Sequence[Tensor]
    teacher_maps: Sequence[Tensor]
    boxes: Tensor
    batch: int
    views: int
    extents: list[tuple[float, float]]
    selected: list[Tensor] | None


def check_loss_inputs(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    boxes: Tensor,
    crop_sizes: Sequence[int | Sequence[int]] | None,
    foreground: Sequence[Tensor] | None,
    loss_mask: str,
    patch_size: int | None,
) -> LossInputs:
    """Check one call's inputs (arguments as ``NeCoLoss.forward`` and its settings).

    Raises:
        TypeError: If maps or boxes are not floating tensors, or a mask is not bool.
        ValueError: If views, boxes, maps, crop sizes and masks disagree in number or shape.

    """
    batch, views = _check_views(student_maps, teacher_maps, boxes)
    return LossInputs(
        student_maps,
        teacher_maps,
        boxes,
        batch,
        views,
        _extents(student_maps, teacher_maps, crop_sizes, patch_size),
        _selected(teacher_maps, foreground, loss_mask),
    )


def _selected(
    teacher_maps: Sequence[Tensor], foreground: Sequence[Tensor] | None, loss_mask: str
) -> list[Tensor] | None:
    """The ``loss_mask`` selection of every teacher view, ``(B, h_c, w_c)`` bool, or None."""
    if loss_mask == "all":
        if foreground is not None:
            raise ValueError("foreground masks need NeCoLoss(loss_mask='foreground' or ...).")
        return None
    if foreground is None or isinstance(foreground, Tensor):
        raise ValueError(
            f"loss_mask={loss_mask!r} needs foreground=[(B, h, w) bool mask per "
            "teacher view] (neco_loss.foreground.foreground_masks)."
        )
    if len(foreground) != len(teacher_maps):
        raise ValueError(
            f"foreground must hold one mask per teacher view ({len(teacher_maps)}) but "
            f"holds {len(foreground)}."
        )
    selected = []
    for view, (mask, teacher_map) in enumerate(zip(foreground, teacher_maps, strict=True)):
        expected = (teacher_map.shape[0], *teacher_map.shape[2:])
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"foreground[{view}] must be a bool tensor but is {kind}.")
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"foreground[{view}] must be (B, h, w) = {expected} like teacher_maps[{view}] "
                f"but has shape {tuple(mask.shape)}."
            )
        selected.append(mask if loss_mask == "foreground" else ~mask)
    return selected


def _extents(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    crop_sizes: Sequence[int | Sequence[int]] | None,
    patch_size: int | None,
) -> list[tuple[float, float]]:
    """Every view's crop extent in tokens, checked against its maps' grids."""
    if crop_sizes is None:
        return [(m.shape[2], m.shape[3]) for m in student_maps]
    if patch_size is None:
        raise ValueError("crop_sizes needs the backbone's patch size: NeCoLoss(patch_size=...).")
    if isinstance(crop_sizes, (Tensor, str)) or len(crop_sizes) != len(student_maps):
        raise ValueError(
            f"crop_sizes must hold one size per view ({len(student_maps)}) but is {crop_sizes!r}."
        )
    extents = []
    for view, size in enumerate(crop_sizes):
        pixels = _crop_pixels(size, view)
        grid = (pixels[0] // patch_size, pixels[1] // patch_size)
        maps = [("student_maps", student_maps[view])]
        if view < len(teacher_maps):
            maps.append(("teacher_maps", teacher_maps[view]))
        for name, feature_map in maps:
            if tuple(feature_map.shape[2:]) != grid:
                raise ValueError(
                    f"{name}[{view}] has a {feature_map.shape[2]}x{feature_map.shape[3]} "
                    f"grid, but a {pixels[0]}x{pixels[1]} px crop at patch_size "
                    f"{patch_size} gives {grid[0]}x{grid[1]} tokens: check crop_sizes "
                    "and patch_size."
                )
        extents.append(crop_extent(pixels, patch_size))
    return extents


def _crop_pixels(size: int | Sequence[int], view: int) -> tuple[int, int]:
    """``(height, width)`` of ``crop_sizes[view]``: a side or a pair of positive ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(
        isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in pair
    ):
        raise ValueError(
            f"crop_sizes[{view}] must be a positive int or (height, width) but is {size!r}."
        )
    return pair[0], pair[1]


def _check_views(
    student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], boxes: Tensor
) -> tuple[int, int]:
    """Validate the maps and boxes; return ``(B, V)``."""
    for name, maps in (("student_maps", student_maps), ("teacher_maps", teacher_maps)):
        if isinstance(maps, Tensor) or not isinstance(maps, Sequence):
            raise TypeError(f"{name} must be a list of (B, D, h, w) tensors, one per view.")
        for index, feature_map in enumerate(maps):
            check_float_tensor(feature_map, f"{name}[{index}]", dims=4, finite=False)
    views = len(student_maps)
    if views < 2:
        raise ValueError(f"student_maps must hold >= 2 views but holds {views}.")
    if not 1 <= len(teacher_maps) <= views:
        raise ValueError(
            f"teacher_maps must hold 1 to {views} views (the global views) but holds "
            f"{len(teacher_maps)}."
        )
    batch, dim = student_maps[0].shape[:2]
    for name, maps in (("student_maps", student_maps), ("teacher_maps", teacher_maps)):
        for index, feature_map in enumerate(maps):
            if tuple(feature_map.shape[:2]) != (batch, dim):
                raise ValueError(
                    f"{name}[{index}] must have (B, D) = {(batch, dim)} like student_maps[0] but "
                    f"has shape {tuple(feature_map.shape)}."
                )
    check_finite(
        {f"student_maps[{i}]": m for i, m in enumerate(student_maps)}
        | {f"teacher_maps[{i}]": m for i, m in enumerate(teacher_maps)}
    )
    check_boxes(boxes)
    if boxes.dim() != 3 or boxes.shape[:2] != (batch, views):
        raise ValueError(
            f"boxes must be (B, V, 4 or 5) = ({batch}, {views}, 4 or 5) for {views} views of "
            f"{batch} images but has shape {tuple(boxes.shape)}."
        )
    if compute_dtype(boxes.dtype) != boxes.dtype:
        raise TypeError(f"boxes must be float32 or float64 but have dtype {boxes.dtype}.")
    return batch, views


def check_loss_mask(loss_mask: str, policy: ReferencePolicy) -> str:
    """``loss_mask`` if the reference policy draws as the reference code's masked loss does."""
    check_choice(loss_mask, "loss_mask", LOSS_MASKS)
    if loss_mask != "all" and (
        policy.strategy not in ("per_image", "queue") or policy.images != "any" or policy.gather
    ):
        raise ValueError(
            f"loss_mask={loss_mask!r} draws references as the reference code does: it needs "
            "references='per_image' or 'queue', reference_images='any' and no gather, but "
            f"got references={policy.strategy!r}, reference_images={policy.images!r}"
            + (" and a gather." if policy.gather else ".")
        )
    return loss_mask
