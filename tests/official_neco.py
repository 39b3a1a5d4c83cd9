"""The NeCo loss as the authors' code computes it, written without any ``neco_loss`` function.

A transcription of github.com/vpariza/NeCo ``src/neco.py`` (``NeCo.knn_loss``,
``compute_knn_perm_mat``, ``compute_knn_subloss``, ``update_queue``) and
``src/neco_transforms.py`` (``calculate_bboxes``) on plain tensors: torchvision's ``roi_align``,
diffsort's ``DiffSortNet``, the cross-entropy written out with an unclamped log. It is the
independent side of ``tests/test_official_equivalence.py``.

Deliberate departures, each a defect of the official code that ``neco_loss`` does not copy
(listed in docs/loss.md):

- reference draws use ``torch.randperm(..., generator=...)`` instead of the global RNG, so that
  both sides can draw the same permutations;
- with a ``loss_mask``, references are drawn from the foreground of the pair's own view
  (``thresholded_mask[v::V]``); the official code indexes ``thresholded_mask[bs * crop_id :
  bs * (crop_id + 1)]``, rows of other images and views;
- the queue's fill counter counts each view's own rows (the official counter is shared by the
  two global views and grows twice as fast, sampling unfilled zero rows early on); the tests
  compare steps with a full queue, where both agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from diffsort import DiffSortNet
from torch import Tensor
from torchvision.ops import roi_align

ROI = 7  # official configs: roi_align_kernel_size: 7
QUEUE_PUSH = 10  # official update_queue: min(bs * 10, queue_length)
MASK_FULL = 1.0 - 1e-6  # official: aligned_mask >= 1.0, with room for the weights' rounding


def calculate_bboxes(crop_boxes: Tensor, size_crops: list[int], global_crops: int):
    """Official ``calculate_bboxes`` for one image's absolute crop boxes ``(V, 4)``.

    Returns:
        ``gc`` ``(C, V, 4)``: the intersection of global crop c with crop v in c's resized
        pixels; ``all`` ``(V, C, 4)``: the same intersection in v's resized pixels.
    """
    views = crop_boxes.shape[0]
    sizes = torch.tensor([size_crops[0]] * global_crops + [size_crops[-1]] * (views - global_crops))
    sizes = sizes.to(crop_boxes.dtype)
    gc, others = [], []
    for c in range(global_crops):
        row_gc, row_other = [], []
        for v in range(views):
            inter = torch.cat(
                [
                    torch.maximum(crop_boxes[c, :2], crop_boxes[v, :2]),
                    torch.minimum(crop_boxes[c, 2:], crop_boxes[v, 2:]),
                ]
            )
            row_gc.append(_to_crop_pixels(inter, crop_boxes[c], sizes[c]))
            row_other.append(_to_crop_pixels(inter, crop_boxes[v], sizes[v]))
        gc.append(torch.stack(row_gc))
        others.append(torch.stack(row_other))
    return torch.stack(gc), torch.stack(others).transpose(0, 1)


def _to_crop_pixels(box: Tensor, crop: Tensor, size: Tensor) -> Tensor:
    """Official: ``crop_size * ((point - crop_x1y1) / crop_wh)`` for both corners."""
    x1y1 = crop[:2]
    wh = crop[2:] - crop[:2]
    return torch.cat([size * ((box[:2] - x1y1) / wh), size * ((box[2:] - x1y1) / wh)])


@dataclass
class OfficialQueue:
    """Official ``NeCo.queue``: one FIFO of teacher tokens per global crop."""

    length: int
    tokens: Tensor | None = None
    filled: list[int] = field(default_factory=list)


def knn_perm_mat(src: Tensor, tgt: Tensor, sorter: DiffSortNet) -> Tensor:
    """Official ``compute_knn_perm_mat`` with ``sim_dist: cosine``."""
    bs, d, ps, ps2 = src.shape
    assert ps == ps2
    src = src.permute(0, 2, 3, 1).reshape(bs, ps * ps, d)
    tgt = tgt.permute(0, 2, 3, 1).reshape(bs, ps * ps, d)
    dist = torch.einsum("bhc,bwc->bhw", F.normalize(src, dim=-1), F.normalize(tgt, dim=-1))
    dist = dist.reshape(-1, dist.shape[-1])
    _, perm = sorter(dist)
    return perm.reshape(bs, ps, ps, ps * ps, ps * ps).permute(0, 4, 3, 1, 2)


def knn_subloss(q: Tensor, p: Tensor, mask: Tensor | None) -> Tensor:
    """Official ``compute_knn_subloss`` (``mask``: the pair's ``(bs, 1, 7, 7)`` thresholded)."""
    if mask is None:
        return -torch.mean(torch.sum(q * torch.log(p), dim=1))
    mask = mask.float()
    if torch.sum(mask).item() == 0:
        return torch.zeros((), dtype=q.dtype)
    mask = torch.repeat_interleave(mask, q.shape[2], dim=1)
    return -torch.sum(torch.sum(q * torch.log(p), dim=1) * mask) / torch.sum(mask)


def official_loss(
    student_maps: list[Tensor],
    teacher_maps: list[Tensor],
    crop_boxes: Tensor,
    size_crops: list[int],
    patch_size: int,
    generator: torch.Generator,
    *,
    sort_net: str = "bitonic",
    steepness: tuple[float, float] = (100.0, 100.0),
    queue: OfficialQueue | None = None,
    foreground: list[Tensor] | None = None,
) -> Tensor:
    """Official ``shared_step`` from the maps on: queue update, then ``knn_loss``.

    Args:
        student_maps: ``V`` maps ``(B, D, r_v, r_v)``, global crops first.
        teacher_maps: ``C`` maps of the global crops (the EMA teacher's, or a second student
            forward for ``use_teacher: False``).
        crop_boxes: ``(B, V, 4)`` absolute crop boxes ``(x0, y0, x1, y1)``.
        size_crops: Official ``size_crops``: ``[global, local]`` pixels.
        patch_size: Official ``patch_size``.
        generator: Draws the queue and reference permutations.
        sort_net: Official ``sort_net``.
        steepness: Official ``(student_steepness, teacher_steepness)``.
        queue: Official queue state (``is_queue_usable: True``), updated in place.
        foreground: ``loss_mask`` selection per global crop, ``(B, r, r)`` bool (``attn_hard``
            after the official ``fg``/``bg`` inversion).

    """
    bs = student_maps[0].shape[0]
    views, global_crops = len(student_maps), len(teacher_maps)
    boxes = [calculate_bboxes(crop_boxes[b], size_crops, global_crops) for b in range(bs)]
    gc_boxes = torch.stack([gc for gc, _ in boxes])  # bboxes["gc"]: (bs, C, V, 4)
    all_boxes = torch.stack([other for _, other in boxes])  # bboxes["all"]: (bs, V, C, 4)
    n = ROI * ROI
    student_sorter = DiffSortNet(sort_net, n, steepness=steepness[0])
    teacher_sorter = DiffSortNet(sort_net, n, steepness=steepness[1])
    if queue is not None:
        _update_queue(queue, teacher_maps, foreground, generator)
    loss = torch.zeros((), dtype=student_maps[0].dtype)
    for crop_id, teacher_map in enumerate(teacher_maps):
        current = torch.unbind(gc_boxes[:, crop_id] / patch_size)
        aligned_emb_gc = roi_align(teacher_map, current, ROI, aligned=True)  # (bs * V, D, 7, 7)
        thresholded = None
        if foreground is not None:
            mask = foreground[crop_id][:, None].to(teacher_map.dtype)
            thresholded = roi_align(mask, current, ROI, aligned=True) >= MASK_FULL
        subloss = torch.zeros((), dtype=loss.dtype)
        for v in range(views):
            if v == crop_id:
                continue
            rois = torch.unbind(all_boxes[:, v, crop_id].unsqueeze(1) / patch_size)
            aligned_out = roi_align(student_maps[v], rois, ROI, aligned=True)
            aligned_emb_gc_sel = aligned_emb_gc[v::views]
            bsl, d, ps1, ps2 = aligned_emb_gc_sel.shape
            pair_mask = None if thresholded is None else thresholded[v::views]
            if queue is not None and queue.filled[crop_id] == queue.length:
                idces = torch.randperm(queue.length, generator=generator)[: bsl * ps1 * ps2]
                tgt = queue.tokens[crop_id][idces].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)
            else:
                flat = aligned_emb_gc_sel.permute(0, 2, 3, 1).flatten(0, 2)
                if pair_mask is not None:
                    flat = flat[pair_mask.flatten()]
                if flat.shape[0] == 0:
                    continue
                repeats = round((bsl * ps1 * ps2) / flat.shape[0]) + 1
                tgt = flat.repeat(repeats, 1)[: bsl * ps1 * ps2]
                idces = torch.randperm(tgt.shape[0], generator=generator)
                tgt = tgt[idces].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)
            p = knn_perm_mat(aligned_out, tgt, student_sorter)
            with torch.no_grad():
                q = knn_perm_mat(aligned_emb_gc_sel, tgt, teacher_sorter)
            subloss = subloss + knn_subloss(q, p, pair_mask)
        loss = loss + subloss / (views - 1)
    return loss / global_crops


def _update_queue(
    queue: OfficialQueue,
    teacher_maps: list[Tensor],
    foreground: list[Tensor] | None,
    generator: torch.Generator,
) -> None:
    """Official ``update_queue``: push ``min(bs * 10, length)`` random tokens, newest first."""
    with torch.no_grad():
        bs, dim = teacher_maps[0].shape[:2]
        if queue.tokens is None:
            queue.tokens = torch.zeros(len(teacher_maps), queue.length, dim)
            queue.tokens = queue.tokens.to(teacher_maps[0].dtype)
            queue.filled = [0] * len(teacher_maps)
        for i, teacher_map in enumerate(teacher_maps):
            emb_gc = teacher_map.permute(0, 2, 3, 1).reshape(-1, dim)
            if foreground is not None:
                emb_gc = emb_gc[foreground[i].flatten()]
            count = min(bs * QUEUE_PUSH, queue.length, emb_gc.shape[0])
            idx = torch.randperm(emb_gc.size(0), generator=generator)[:count]
            queue.tokens[i, count:] = queue.tokens[i, :-count].clone()
            queue.tokens[i, :count] = emb_gc[idx]
            queue.filled[i] = min(queue.filled[i] + count, queue.length)
