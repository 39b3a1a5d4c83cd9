"""Crop boxes, their intersections, and ROI alignment of two views' patch maps.

A view's box is ``(x0, y0, x1, y1)`` in original-image pixels (the region the crop covers before
it is resized), optionally with a 5th column ``flip`` (1 = the view was flipped horizontally).
Two views of one image see the same content in the intersection of their boxes; ``align_pair``
resamples both patch maps on that intersection so that token ``k`` of one matches token ``k``
of the other (reference code: ``torchvision.ops.roi_align(..., output_size=7, aligned=True)``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

from neco_loss.checks import check_finite, check_float_tensor, compute_dtype

REFERENCE_ROI_SIZE = 7  # reference configs: roi_align_kernel_size: 7


def check_boxes(boxes: object, name: str = "boxes") -> Tensor:
    """Return ``boxes`` if it is a finite float tensor ``(..., 4 or 5)`` of proper boxes.

    Raises:
        TypeError: If it is not a floating tensor.
        ValueError: If the last dimension is not 4 or 5, a box has ``x1 <= x0`` or ``y1 <= y0``,
            or a flip column holds values other than 0 and 1.

    """
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor but is {type(boxes).__name__}.")
    boxes = check_float_tensor(boxes, name, dims=boxes.dim(), finite=False)
    if boxes.dim() == 0 or boxes.shape[-1] not in (4, 5):
        raise ValueError(
            f"{name} must have 4 columns (x0, y0, x1, y1) or 5 (+ flip) but has shape "
            f"{tuple(boxes.shape)}."
        )
    empty = (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])
    flip = boxes[..., 4] if boxes.shape[-1] == 5 else torch.zeros_like(boxes[..., 0])
    bad_flip = (flip != 0) & (flip != 1)
    # One host sync for the three checks; the errors are worked out only when one fails.
    infinite, any_empty, any_bad_flip = torch.stack(
        [~torch.isfinite(boxes).all(), empty.any(), bad_flip.any()]
    ).tolist()
    if infinite:
        check_finite({name: boxes})
    if any_empty:
        first = boxes[empty][0].tolist()
        raise ValueError(
            f"{name} must have x1 > x0 and y1 > y0 but {int(empty.sum())} boxes do not, "
            f"e.g. {first}."
        )
    if any_bad_flip:
        raise ValueError(
            f"{name}[..., 4] (flip) must be 0 or 1 but holds {boxes[..., 4].unique()}."
        )
    return boxes


def intersect(box_a: Tensor, box_b: Tensor) -> Tensor:
    """Intersection of two boxes (broadcast): ``(..., 4)``; empty where ``x1 <= x0 or y1 <= y0``.

    Args:
        box_a: ``(..., 4 or 5)`` boxes; a flip column is ignored.
        box_b: ``(..., 4 or 5)`` boxes.

    Returns:
        ``(..., 4)`` ``(max x0, max y0, min x1, min y1)``; test with ``is_nonempty``.

    """
    top_left = torch.maximum(box_a[..., :2], box_b[..., :2])
    bottom_right = torch.minimum(box_a[..., 2:4], box_b[..., 2:4])
    return torch.cat([top_left, bottom_right], dim=-1)


def intersection_area(box_a: Tensor, box_b: Tensor) -> Tensor:
    """``(...,)`` area shared by two boxes (broadcast), 0 where they do not overlap."""
    shared = intersect(box_a, box_b)
    return (shared[..., 2] - shared[..., 0]).clamp(min=0) * (shared[..., 3] - shared[..., 1]).clamp(
        min=0
    )


def is_nonempty(box: Tensor) -> Tensor:
    """``(...,)`` bool: whether each ``(..., 4)`` box has positive area."""
    return (box[..., 2] > box[..., 0]) & (box[..., 3] > box[..., 1])


def box_to_grid(box: Tensor, crop_box: Tensor, grid_hw: tuple[float, float]) -> Tensor:
    """Map original-image boxes into a view's token-grid coordinates.

    ``x_grid = (x - crop_x0) / crop_w * w`` and likewise for y, so the crop spans ``[0, w]``: the
    continuous coordinates of ``roi_align(aligned=True)``, where token ``j`` covers ``[j, j+1)``.
    For a flipped view (``crop_box[..., 4] == 1``) ``x_grid`` becomes ``w - x_grid`` and the box's
    x-ends swap.

    Args:
        box: ``(..., 4)`` boxes in original-image pixels.
        crop_box: ``(..., 4 or 5)`` the view's crop box (broadcast with ``box``).
        grid_hw: ``(h, w)`` the extent of the crop in tokens: the view's token grid, or
            ``crop pixels / patch size`` when the crop side is not a multiple of the patch
            (``crop_extent``).

    Returns:
        ``(..., 4)`` boxes in grid coordinates.

    """
    height, width = grid_hw
    crop_w = crop_box[..., 2] - crop_box[..., 0]
    crop_h = crop_box[..., 3] - crop_box[..., 1]
    x0 = (box[..., 0] - crop_box[..., 0]) / crop_w * width
    x1 = (box[..., 2] - crop_box[..., 0]) / crop_w * width
    y0 = (box[..., 1] - crop_box[..., 1]) / crop_h * height
    y1 = (box[..., 3] - crop_box[..., 1]) / crop_h * height
    if crop_box.shape[-1] == 5:
        flipped = crop_box[..., 4] == 1
        x0, x1 = torch.where(flipped, width - x1, x0), torch.where(flipped, width - x0, x1)
    return torch.stack([x0, y0, x1, y1], dim=-1)


def crop_extent(crop_pixels: tuple[int, int], patch_size: int) -> tuple[float, float]:
    """``(h, w)`` extent of a crop in token units: ``pixels / patch_size``.

    A ViT's strided patch embedding covers the first ``floor(pixels / patch)`` patches and never
    sees the last ``pixels % patch`` pixels, so token ``j`` covers crop pixels
    ``[j * patch, (j + 1) * patch)`` and the crop spans ``pixels / patch`` tokens, not the grid's
    ``floor``: the reference code's frame (``calculate_bboxes`` scales boxes to crop pixels and
    ``knn_loss`` divides them by ``patch_size``), e.g. 6.125 tokens for a 98 px crop at patch 16.
    """
    return crop_pixels[0] / patch_size, crop_pixels[1] / patch_size


def _roi_tokens(feature_map: Tensor, grid_boxes: Tensor, flipped: Tensor, roi_size: int) -> Tensor:
    """``(B, roi_size**2, D)``: ``feature_map (B, D, h, w)`` sampled on one grid box per image."""
    batch_index = torch.arange(len(grid_boxes), device=grid_boxes.device, dtype=grid_boxes.dtype)
    rois = torch.cat([batch_index[:, None], grid_boxes], dim=1)
    aligned = roi_align(feature_map, rois, output_size=roi_size, aligned=True)  # (B, D, S, S)
    # A flipped view's samples run right to left in original-image x: put them back in order.
    aligned = torch.where(flipped[:, None, None, None], aligned.flip(-1), aligned)
    return aligned.flatten(2).transpose(1, 2)


def align_pair(
    map_a: Tensor,
    map_b: Tensor,
    boxes_a: Tensor,
    boxes_b: Tensor,
    roi_size: int = REFERENCE_ROI_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """ROI-align two views' patch maps on the intersection of their crops.

    Args:
        map_a: ``(B, D, h_a, w_a)`` patch map of view a (e.g. 16x16 for a 224 px crop, patch 14).
        map_b: ``(B, D, h_b, w_b)`` patch map of view b (e.g. 7x7 for a 98 px crop).
        boxes_a: ``(B, 4 or 5)`` view a's crop boxes in original-image pixels (+ flip).
        boxes_b: ``(B, 4 or 5)`` view b's crop boxes.
        roi_size: Side of the aligned grid (reference: 7, so 49 tokens).

    Returns:
        ``aligned_a``, ``aligned_b``: ``(B, roi_size**2, D)`` tokens in row-major order of the
        shared region (float32 for half inputs), and ``valid``: ``(B,)`` bool, False where the
        crops do not overlap. Rows of invalid pairs hold features of the whole view and must be
        left out of a loss.

    Raises:
        TypeError: If a map or box tensor is not floating point.
        ValueError: If shapes disagree (batch, feature dims, box columns) or boxes are not proper.

    """
    for name, feature_map in (("map_a", map_a), ("map_b", map_b)):
        check_float_tensor(feature_map, name, dims=4, finite=False)
    check_finite({"map_a": map_a, "map_b": map_b})
    if map_a.shape[:2] != map_b.shape[:2]:
        raise ValueError(
            f"map_a and map_b must agree in (B, D) but have shapes {tuple(map_a.shape)} and "
            f"{tuple(map_b.shape)}."
        )
    for name, boxes in (("boxes_a", boxes_a), ("boxes_b", boxes_b)):
        check_boxes(boxes, name)
        if boxes.dim() != 2 or boxes.shape[0] != map_a.shape[0]:
            raise ValueError(
                f"{name} must be ({map_a.shape[0]}, 4 or 5) for a batch of {map_a.shape[0]} but "
                f"has shape {tuple(boxes.shape)}."
            )
    if isinstance(roi_size, bool) or not isinstance(roi_size, int) or roi_size < 1:
        raise ValueError(f"roi_size must be an int >= 1 but is {roi_size!r}.")
    return align_checked_pair(map_a, map_b, boxes_a, boxes_b, roi_size)


def align_checked_pair(
    map_a: Tensor,
    map_b: Tensor,
    boxes_a: Tensor,
    boxes_b: Tensor,
    roi_size: int,
    extents: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``align_pair`` for arguments already checked: no validation, so no host sync.

    Args:
        map_a: ``(B, D, h_a, w_a)`` finite floating patch map.
        map_b: ``(B, D, h_b, w_b)``.
        boxes_a: ``(B, 4 or 5)`` proper boxes.
        boxes_b: ``(B, 4 or 5)``.
        roi_size: Side of the aligned grid, >= 1.
        extents: Each view's crop extent in tokens (``crop_extent``); ``None``: the maps' grids.

    Returns:
        As ``align_pair``.

    """
    dtype = compute_dtype(map_a.dtype)
    map_a, map_b = map_a.to(dtype), map_b.to(dtype)
    boxes_a, boxes_b = boxes_a.to(device=map_a.device, dtype=dtype), boxes_b.to(map_a.device, dtype)
    shared = intersect(boxes_a, boxes_b)
    valid = is_nonempty(shared)
    if extents is None:
        extents = ((map_a.shape[2], map_a.shape[3]), (map_b.shape[2], map_b.shape[3]))
    aligned = []
    for feature_map, boxes, extent in ((map_a, boxes_a, extents[0]), (map_b, boxes_b, extents[1])):
        # Invalid pairs sample their whole view (finite, left out by the caller), not an empty box.
        source = torch.where(valid[:, None], shared, boxes[:, :4])
        grid = box_to_grid(source, boxes, extent)
        flipped = boxes[:, 4] == 1 if boxes.shape[1] == 5 else torch.zeros_like(valid)
        aligned.append(_roi_tokens(feature_map, grid, flipped, roi_size))
    return aligned[0], aligned[1], valid


def overlapping_pairs(boxes: Tensor, teacher_views: int) -> list[list[list[bool]]]:
    """``[c][v][b]``: whether teacher view ``c``'s crop overlaps view ``v``'s in image ``b``.

    One host transfer for all pairs, so that the pair loop needs none.
    """
    shared = intersect(boxes[:, :teacher_views, None], boxes[:, None, :])  # (B, C, V, 4)
    return is_nonempty(shared).permute(1, 2, 0).tolist()
