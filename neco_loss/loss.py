"""``NeCoLoss``: the NeCo loss on multi-crop patch maps, as most users call it.

Reference: Pariza et al., "Near, far: Patch-ordering enhances vision foundation models' scene
understanding", arXiv 2408.11054 (2024); reference code github.com/vpariza/NeCo.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neco_loss.checks import check_choice, check_finite, check_float_tensor, compute_dtype
from neco_loss.diagnostics import NeCoStats, spearman
from neco_loss.functional import (
    REFERENCE_STEEPNESS,
    SIMILARITIES,
    NeCoTerms,
    SortOptions,
    compare_valid_scores,
    similarity_scores,
)
from neco_loss.geometry import (
    REFERENCE_ROI_SIZE,
    align_checked_pair,
    check_boxes,
    crop_extent,
    intersect,
    is_nonempty,
)
from neco_loss.permutation_losses import EPSILON, check_top_k
from neco_loss.references import (
    DEFAULT_QUEUE_LENGTH,
    REFERENCE_IMAGES,
    REFERENCE_SOURCES,
    REFERENCE_STRATEGIES,
    ReferenceQueue,
    fraction_count,
    per_image_references,
    shared_references,
)
from neco_loss.sorting.networks import sorts_every_input

PERMUTATION_WARNING_BYTES = 8 * 2**30  # warn before a step whose Q_s alone exceeds 8 GiB
LOSS_MASKS = ("all", "foreground", "background")  # reference loss_mask: all, fg, bg
# A token is selected when its ROI-aligned 0/1 mask is >= 1 (reference: aligned_mask >= 1.0),
# i.e. all its bilinear samples fall on the mask; 1 - 1e-6 absorbs the weights' rounding.
MASK_FULL = 1.0 - 1e-6


class _PairScores(NamedTuple):
    """One pair's ``(rows, R)`` scores and, with ``loss_mask``, each row's ``(rows,)`` weight."""

    student: Tensor
    teacher: Tensor
    weight: Tensor | None


class NeCoLoss(nn.Module):
    """NeCo loss between a student's views and an EMA teacher's global views.

    Every teacher global view ``c`` is paired with every student view ``v != c``; both patch maps
    are ROI-aligned on the intersection of the two crops (``roi_size x roi_size`` tokens), each
    aligned patch is compared with reference patches, the similarities are soft-sorted, and the
    student's soft permutation is pulled towards the teacher's. The loss is the mean over all
    overlapping (image, pair) combinations, i.e. the reference code's ``mean_c sum_{v != c} /
    (V - 1)`` when every pair overlaps. Pairs whose crops do not overlap are left out and
    counted in ``last_stats``.

    Args:
        roi_size: Side of the aligned grid (reference: 7, so N = 49 patches per pair).
        references: ``"per_image"`` (reference code), ``"fraction"``, ``"count"`` or
            ``"queue"``; see ``neco_loss.references``.
        reference_fraction: ``f`` of ``R = f * B * N`` for ``references="fraction"``.
        num_references: ``R`` for ``"count"`` (required) and ``"queue"`` (default
            ``roi_size**2``).
        queue_length: Tokens per queue for ``"queue"`` (reference DINOv2 configs: 8192).
        reference_images: ``"any"``, ``"intra"`` or ``"inter"`` (paper Table 5c).
        reference_source: ``"teacher"`` (reference code) or ``"student"`` (paper text) patches
            as references; always detached.
        network: Sorting network (``"bitonic"``, ``"bitonic_padded"``, ``"odd_even"``).
        steepness: ``(student, teacher)`` or one value (reference configs: 100, 100).
        relaxation: Swap probability (diffsort 0.2.0's default ``"cauchy"``).
        backend: ``"native"``, ``"diffsort"`` or ``"torchsort"``.
        similarity: ``"cosine"`` (reference configs) or ``"euclidean"``.
        loss: ``"ce"`` (reference), ``"l1"`` or ``"l2"``.
        direction: CE direction: ``"teacher_to_student"`` (reference code),
            ``"student_to_teacher"`` or ``"both"`` (the paper's formula).
        top_k: Compare only the ``k`` nearest-neighbour ranks (paper Table 9a).
        epsilon: Clamp of probabilities before their log (``None``: the dtype's smallest
            normal, exact above it; see ``neco_loss.permutation_losses.EPSILON``).
        seed: Seeds a private CPU generator for the reference draws; ``None`` uses the global RNG.
        loss_mask: Which query patches the loss compares (reference ``loss_mask``): ``"all"``,
            ``"foreground"`` or ``"background"`` patches of the teacher's global view, given
            to ``forward`` as ``foreground`` masks (``neco_loss.foreground.foreground_masks``
            of the teacher's CLS attention). Masked: batch references are drawn from the
            selected patches only, the queue holds only selected tokens, and the loss is the
            mean over pairs of each pair's mean over its selected patches (0 for a pair with
            none), as the reference code's ``compute_knn_subloss``.
        patch_size: The backbone's patch side in pixels. With ``forward(..., crop_sizes=)`` boxes
            are mapped to token units as ``pixels / patch_size``, the reference code's frame,
            which differs from the token grid when a crop side is not a multiple of the patch
            (98 px crops at patch 16: 6.125 tokens of which the ViT sees 6).
        compute_stats: Fill ``last_stats`` on every call. Off by default: the diagnostics cost
            two extra teacher sorts and several host syncs per call (about 25-30% of a CPU loss
            step); ask for them on logging steps with ``forward(..., compute_stats=True)``.
        gather: Draw references from the batches of all processes: a function returning a
            tensor from every process, in rank order (e.g. ``lightly.utils.dist.gather``, or
            ``neco_loss.references.all_gather``). Every process must use the same ``seed``;
            then each process's loss equals the single-process loss on the concatenated batch
            restricted to its images, the queue included (it is filled with every process's
            tokens).

    Attributes:
        last_stats: ``NeCoStats`` of the last call that computed them (``None`` before).

    Examples:
        >>> import torch
        >>> criterion = NeCoLoss()
        >>> student_maps = [torch.randn(2, 32, 16, 16) for _ in range(2)]
        >>> student_maps += [torch.randn(2, 32, 7, 7) for _ in range(2)]
        >>> teacher_maps = [torch.randn(2, 32, 16, 16) for _ in range(2)]
        >>> boxes = torch.tensor([[0, 0, 100, 100], [20, 20, 120, 120],
        ...                       [10, 10, 50, 50], [60, 60, 90, 90]]).float().expand(2, -1, -1)
        >>> loss = criterion(student_maps, teacher_maps, boxes, compute_stats=True)
        >>> criterion.last_stats.valid_pairs
        12

    """

    def __init__(
        self,
        roi_size: int = REFERENCE_ROI_SIZE,
        references: str = "per_image",
        *,
        reference_fraction: float | None = None,
        num_references: int | None = None,
        queue_length: int = DEFAULT_QUEUE_LENGTH,
        reference_images: str = "any",
        reference_source: str = "teacher",
        network: str = "bitonic",
        steepness: float | tuple[float, float] = (REFERENCE_STEEPNESS, REFERENCE_STEEPNESS),
        relaxation: str = "cauchy",
        backend: str = "native",
        similarity: str = "cosine",
        loss: str = "ce",
        direction: str = "teacher_to_student",
        top_k: int | None = None,
        epsilon: float | None = EPSILON,
        seed: int | None = None,
        loss_mask: str = "all",
        patch_size: int | None = None,
        compute_stats: bool = False,
        gather: Callable[[Tensor], Sequence[Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(roi_size, bool) or not isinstance(roi_size, int) or roi_size < 1:
            raise ValueError(f"roi_size must be an int >= 1 but is {roi_size!r}.")
        check_choice(references, "references", REFERENCE_STRATEGIES)
        check_choice(reference_images, "reference_images", REFERENCE_IMAGES)
        check_choice(reference_source, "reference_source", REFERENCE_SOURCES)
        check_choice(similarity, "similarity", SIMILARITIES)
        self.options = SortOptions(
            network, steepness, relaxation, backend, loss, direction, top_k, epsilon
        )
        self.roi_size = roi_size
        self.references = references
        self.reference_fraction = _check_fraction(references, reference_fraction)
        self.num_references = _check_num_references(references, num_references, roi_size)
        self.reference_images = reference_images
        self.reference_source = reference_source
        self.similarity = similarity
        self.compute_stats = compute_stats
        check_choice(loss_mask, "loss_mask", LOSS_MASKS)
        if loss_mask != "all" and (
            references not in ("per_image", "queue") or reference_images != "any" or gather
        ):
            raise ValueError(
                f"loss_mask={loss_mask!r} draws references as the reference code does: it needs "
                "references='per_image' or 'queue', reference_images='any' and no gather, but "
                f"got references={references!r}, reference_images={reference_images!r}"
                + (" and a gather." if gather else ".")
            )
        self.loss_mask = loss_mask
        if references == "queue" and reference_images != "any":
            raise ValueError(
                f"reference_images={reference_images!r} needs references from the batch; the "
                "queue mixes images: use references='per_image', 'fraction' or 'count'."
            )
        if self.num_references is not None:
            check_top_k(top_k, self.num_references)
            self.options.check_size(self.num_references)
        self.queue = ReferenceQueue(queue_length) if references == "queue" else None
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        if patch_size is not None and (
            isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1
        ):
            raise ValueError(f"patch_size must be an int >= 1 or None but is {patch_size!r}.")
        self.patch_size = patch_size
        self.gather = gather
        self.last_stats: NeCoStats | None = None

    def forward(
        self,
        student_maps: Sequence[Tensor],
        teacher_maps: Sequence[Tensor],
        boxes: Tensor,
        *,
        crop_sizes: Sequence[int | Sequence[int]] | None = None,
        foreground: Sequence[Tensor] | None = None,
        compute_stats: bool | None = None,
    ) -> Tensor:
        """Compute the loss.

        Inputs are validated once per call, with a fixed number of host syncs whatever the
        number of views (see ``benchmarks/loss_step.py``).

        Args:
            student_maps: ``V`` student patch maps ``(B, D, h_v, w_v)``, global views first.
            teacher_maps: ``C`` teacher patch maps ``(B, D, h_c, w_c)`` of the first ``C``
                views (the global views), ``1 <= C <= V``.
            boxes: ``(B, V, 4 or 5)`` every view's crop box in original-image pixels
                ``(x0, y0, x1, y1[, flip])``.
            crop_sizes: Every view's crop size in pixels, ``side`` or ``(height, width)`` (e.g.
                ``[224, 224, 98, 98, 98, 98]``); needs ``patch_size``. Boxes are then mapped as
                the reference code maps them, exactly for any crop and patch size, and a map
                whose grid is not ``floor(pixels / patch_size)`` is refused. ``None``: each
                crop spans its map's grid (the same when crop sides are multiples of the
                patch).
            foreground: With ``loss_mask`` other than ``"all"`` (and only then): for each
                teacher view, ``(B, h_c, w_c)`` bool foreground patches of its map.
            compute_stats: Fill ``last_stats`` for this call (``None``: the module's
                ``compute_stats``).

        Returns:
            Scalar loss (float32 for half inputs).

        Raises:
            TypeError: If maps or boxes are not floating tensors.
            ValueError: If views, boxes and maps disagree in number, batch or feature size, boxes
                are malformed, or no pair of crops overlaps in any image.

        """
        batch, views = _check_views(student_maps, teacher_maps, boxes)
        extents = self._extents(student_maps, teacher_maps, crop_sizes)
        selected = self._selected(teacher_maps, foreground)
        stats = self.compute_stats if compute_stats is None else compute_stats
        with torch.autocast(device_type=boxes.device.type, enabled=False):
            return self._loss(
                student_maps, teacher_maps, boxes, batch, views, extents, selected, stats
            )

    def _selected(
        self, teacher_maps: Sequence[Tensor], foreground: Sequence[Tensor] | None
    ) -> list[Tensor] | None:
        """The ``loss_mask`` selection of every teacher view, ``(B, h_c, w_c)`` bool, or None."""
        if self.loss_mask == "all":
            if foreground is not None:
                raise ValueError("foreground masks need NeCoLoss(loss_mask='foreground' or ...).")
            return None
        if foreground is None or isinstance(foreground, Tensor):
            raise ValueError(
                f"loss_mask={self.loss_mask!r} needs foreground=[(B, h, w) bool mask per "
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
            selected.append(mask if self.loss_mask == "foreground" else ~mask)
        return selected

    def _extents(
        self,
        student_maps: Sequence[Tensor],
        teacher_maps: Sequence[Tensor],
        crop_sizes: Sequence[int | Sequence[int]] | None,
    ) -> list[tuple[float, float]]:
        """Every view's crop extent in tokens, checked against its maps' grids."""
        if crop_sizes is None:
            return [(m.shape[2], m.shape[3]) for m in student_maps]
        if self.patch_size is None:
            raise ValueError(
                "crop_sizes needs the backbone's patch size: NeCoLoss(patch_size=...)."
            )
        if isinstance(crop_sizes, (Tensor, str)) or len(crop_sizes) != len(student_maps):
            raise ValueError(
                f"crop_sizes must hold one size per view ({len(student_maps)}) but is "
                f"{crop_sizes!r}."
            )
        extents = []
        for view, size in enumerate(crop_sizes):
            pixels = _crop_pixels(size, view)
            grid = (pixels[0] // self.patch_size, pixels[1] // self.patch_size)
            maps = [("student_maps", student_maps[view])]
            if view < len(teacher_maps):
                maps.append(("teacher_maps", teacher_maps[view]))
            for name, feature_map in maps:
                if tuple(feature_map.shape[2:]) != grid:
                    raise ValueError(
                        f"{name}[{view}] has a {feature_map.shape[2]}x{feature_map.shape[3]} "
                        f"grid, but a {pixels[0]}x{pixels[1]} px crop at patch_size "
                        f"{self.patch_size} gives {grid[0]}x{grid[1]} tokens: check crop_sizes "
                        "and patch_size."
                    )
            extents.append(crop_extent(pixels, self.patch_size))
        return extents

    def _loss(
        self,
        student_maps: Sequence[Tensor],
        teacher_maps: Sequence[Tensor],
        boxes: Tensor,
        batch: int,
        views: int,
        extents: list[tuple[float, float]],
        selected: list[Tensor] | None,
        compute_stats: bool,
    ) -> Tensor:
        if self.queue is not None:
            self._push(student_maps, teacher_maps, selected)
        overlaps = _overlapping_pairs(boxes, len(teacher_maps))  # [c][v][b] on the host
        groups: dict[int, list[_PairScores]] = {}
        valid_pairs = 0
        compared_pairs = 0  # (c, v) pairs with an overlapping image: the masked mean's divisor
        for teacher_view, teacher_map in enumerate(teacher_maps):
            for student_view in range(views):
                if student_view == teacher_view:
                    continue
                overlapping = overlaps[teacher_view][student_view]  # (B,) bools
                if not any(overlapping) and self.gather is None:
                    continue
                valid_pairs += sum(overlapping)
                compared_pairs += 1
                scores = self._pair_scores(
                    teacher_view,
                    (teacher_map, student_maps[student_view]),
                    (boxes[:, teacher_view], boxes[:, student_view]),
                    (extents[teacher_view], extents[student_view]),
                    overlapping,
                    None if selected is None else selected[teacher_view],
                )
                if scores is not None:
                    groups.setdefault(scores.student.shape[-1], []).append(scores)
        total_pairs = batch * len(teacher_maps) * (views - 1)
        if valid_pairs == 0:
            raise ValueError(
                f"no crop pair overlaps in any of the {batch} images ({total_pairs} pairs): "
                "check the boxes (original-image pixels, (x0, y0, x1, y1))."
            )
        if not groups:  # loss_mask selected no patch in this batch (the reference: loss 0)
            return torch.stack([m.sum() for m in student_maps]).sum().float() * 0.0
        terms = [self._terms(pairs) for pairs in groups.values()]
        per_row = torch.cat([term.per_row for term in terms])
        if selected is None:
            loss = per_row.mean()
        else:  # reference compute_knn_subloss: masked mean per pair, then mean over pairs
            weights = torch.cat(
                [
                    pair.weight
                    for pairs in groups.values()
                    for pair in pairs
                    if pair.weight is not None
                ]
            )
            loss = (per_row * weights).sum() / compared_pairs
        if compute_stats:
            self.last_stats = self._stats(loss, terms, valid_pairs, total_pairs)
        return loss

    def _push(
        self,
        student_maps: Sequence[Tensor],
        teacher_maps: Sequence[Tensor],
        selected: list[Tensor] | None,
    ) -> None:
        """Queue every teacher view's tokens (reference: before the loss of the step)."""
        assert self.queue is not None  # only called with a queue
        source_maps = teacher_maps if self.reference_source == "teacher" else student_maps
        for view in range(len(teacher_maps)):
            tokens = source_maps[view].flatten(2).transpose(1, 2).detach()  # (B, h * w, D)
            keep = None if selected is None else selected[view].flatten(1)  # (B, h * w)
            if self.gather is not None:  # every process queues every process's tokens
                tokens = torch.cat(list(self.gather(tokens.contiguous())))
            self.queue.push(view, tokens, len(teacher_maps), self.generator, keep)

    def _pair_scores(
        self,
        teacher_view: int,
        maps: tuple[Tensor, Tensor],
        boxes: tuple[Tensor, Tensor],
        extents: tuple[tuple[float, float], tuple[float, float]],
        overlapping: list[bool],
        selected: Tensor | None,
    ) -> _PairScores | None:
        """Student and teacher scores of one (teacher view, student view) pair.

        ``None`` when ``loss_mask`` leaves no patch of the pair (the pair counts as 0).
        """
        teacher_map, student_map = maps
        if selected is not None:  # align the mask with the teacher's tokens, as one channel
            teacher_map = torch.cat([teacher_map, selected[:, None].to(teacher_map.dtype)], 1)
        teacher, student, valid = align_checked_pair(
            teacher_map, student_map, boxes[0], boxes[1], self.roi_size, extents
        )
        keep = None
        if selected is not None:
            # reference: roi_align of the 0/1 mask, kept where >= 1 (all samples on the mask)
            teacher, keep = teacher[..., :-1], teacher[..., -1] >= MASK_FULL
        if self.gather is None:
            if not all(overlapping):  # keep the overlapping images (host indices)
                kept = [image for image, overlap in enumerate(overlapping) if overlap]
                index = torch.tensor(kept, device=teacher.device)
                teacher, student = teacher[index], student[index]
                keep = None if keep is None else keep[index]
            empty = keep is not None and not bool(keep.any())
            queued = self.queue is not None and self.queue.is_full(teacher_view)
            if empty and not queued:  # reference: skipped before its batch draw
                return None
            references = self._references(teacher_view, self._pool(teacher, student), keep)
            if empty:  # reference: the queue draw happens, the pair's loss is 0
                return None
        else:
            references = self._gathered_references(teacher_view, teacher, student, valid)
            teacher, student = teacher[valid], student[valid]
        student_scores = similarity_scores(student, references, self.similarity).flatten(0, 1)
        teacher_scores = similarity_scores(teacher.detach(), references.detach(), self.similarity)
        teacher_scores = teacher_scores.flatten(0, 1)
        if len(student_scores) == 0:  # with gather, a process may hold no valid image here
            return None
        if keep is None:
            return _PairScores(student_scores, teacher_scores, None)
        rows = keep.flatten()
        count = int(rows.sum())  # this pair's selected rows: each weighs 1 / count
        weight = student_scores.new_full((count,), 1.0 / count)
        return _PairScores(student_scores[rows], teacher_scores[rows], weight)

    def _terms(self, pairs: list[_PairScores]) -> NeCoTerms:
        """Sort the scores of all pairs with the same ``R`` in one call."""
        student_scores = torch.cat([pair.student for pair in pairs])
        teacher_scores = torch.cat([pair.teacher for pair in pairs])
        rows, count = student_scores.shape
        if count == 1:  # e.g. a small reference fraction of a small batch: round(f * B * N) = 1
            warnings.warn(
                "NeCoLoss: R = 1 reference: one reference has no order, so the loss is 0 and "
                "nothing learns; raise the reference fraction or count, or the batch size.",
                stacklevel=3,
            )
        if rows * count * count * 4 > PERMUTATION_WARNING_BYTES:
            warnings.warn(
                f"NeCoLoss: {rows} rows x R = {count} references make soft permutations of "
                f"{rows * count * count * 4 / 2**30:.1f} GiB; lower the reference fraction or "
                "count, or the batch size.",
                stacklevel=3,
            )
        options = self._options_for(count)
        check_top_k(options.top_k, count)
        return compare_valid_scores(student_scores, teacher_scores, options)

    def _options_for(self, count: int) -> SortOptions:
        """The sort options for ``R = count``.

        ``R = f * B * N`` follows the batch, so for ``references="fraction"`` a size at which
        diffsort's bitonic layout mis-sorts switches to ``"bitonic_padded"`` (with a warning)
        instead of failing mid-training. Fixed sizes were checked by the constructor.
        """
        if (
            self.references != "fraction"
            or self.options.network != "bitonic"
            or self.options.backend not in ("native", "native-python")
            or sorts_every_input("bitonic", count)
        ):
            return self.options
        warnings.warn(
            f"NeCoLoss: diffsort's bitonic layout mis-sorts R = {count} references; using "
            "network='bitonic_padded' for this step.",
            stacklevel=4,
        )
        return replace(self.options, network="bitonic_padded")

    def check_batch(self, batch: int) -> None:
        """Raise before training if a batch of ``batch`` images cannot feed the references.

        Args:
            batch: Images per step whose patches are candidates (all processes' with
                ``gather``).

        Raises:
            ValueError: If the strategy needs more candidate patches than such a batch has, or
                the queue is shorter than one step's draw.

        """
        patches = self.roi_size**2
        available = {"any": batch, "intra": 1, "inter": batch - 1}[self.reference_images] * patches
        count = self._reference_count(batch, patches)
        if self.references != "queue" and (available < 1 or count > available):
            raise ValueError(
                f"references={self.references!r} with reference_images="
                f"{self.reference_images!r} draws {count} references per image, but a batch of "
                f"{batch} images x {patches} aligned patches offers {available}; use a larger "
                "batch or fewer references."
            )
        if self.queue is not None and batch * count > self.queue.length:
            raise ValueError(
                f"queue_length {self.queue.length} is shorter than one step's draw of {count} "
                f"references x {batch} images; use a longer queue or a smaller batch."
            )

    def _gathered_references(
        self, teacher_view: int, teacher: Tensor, student: Tensor, valid: Tensor
    ) -> Tensor:
        """References of this process's valid images when drawing across processes.

        They are drawn for the valid images of every process, as one process would draw them
        for the whole batch, and this process keeps its images': ``(B_valid, R, D)`` or
        ``(R, D)``.
        """
        assert self.gather is not None  # only called with gather
        pool = self._pool(teacher, student)
        shapes = torch.cat(list(self.gather(torch.tensor(pool.shape, device=pool.device))))
        if not bool((shapes.view(-1, 3) == shapes[:3]).all()):
            raise ValueError(
                "gather needs the same (B, N, D) on every process but got "
                f"{shapes.view(-1, 3).tolist()}; use equal per-process batches (drop_last=True)."
            )
        pools = torch.cat(list(self.gather(pool.contiguous())))  # (world * B, N, D)
        valids = torch.cat(list(self.gather(valid.to(pool.dtype).contiguous()))).bool()
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        counts = valids.view(-1, len(valid)).sum(dim=1)  # valid images per process
        offset, mine = int(counts[:rank].sum()), int(counts[rank])
        references = self._references(teacher_view, pools[valids])
        return references if references.dim() == 2 else references[offset : offset + mine]

    def _pool(self, teacher: Tensor, student: Tensor) -> Tensor:
        """The aligned patches references are drawn from (``reference_source``).

        Teacher patches keep their gradient, if any: the reference code's ``use_teacher:
        False`` ablation passes a second student forward as the teacher, and its references
        carry gradient; an EMA teacher has none. Student patches are detached.
        """
        return teacher if self.reference_source == "teacher" else student.detach()

    def _reference_count(self, batch: int, patches: int) -> int:
        """``R`` per query for ``batch`` images of ``patches`` aligned patches each."""
        if self.references == "fraction":
            assert self.reference_fraction is not None  # set by the constructor
            return fraction_count(self.reference_fraction, batch, patches, self.reference_images)
        return self.num_references or patches

    def _references(self, teacher_view: int, pool: Tensor, keep: Tensor | None = None) -> Tensor:
        """References for a pool ``(B, N, D)`` of valid images: ``(B, R, D)`` or ``(R, D)``.

        ``keep`` ``(B, N)`` restricts batch draws to the patches ``loss_mask`` selects.
        """
        batch, patches, _ = pool.shape
        count = self._reference_count(batch, patches)
        if self.queue is not None and self.queue.is_full(teacher_view):
            return self.queue.sample(teacher_view, batch, count, self.generator).to(pool.dtype)
        if self.references in ("per_image", "queue"):  # the queue falls back to per_image
            return per_image_references(pool, patches, self.reference_images, self.generator, keep)
        if self.reference_images == "any":
            return shared_references(pool, count, self.generator)
        return per_image_references(pool, count, self.reference_images, self.generator)

    def _stats(
        self, loss: Tensor, terms: list[NeCoTerms], valid_pairs: int, total_pairs: int
    ) -> NeCoStats:
        with torch.no_grad():
            rows = sum(len(term.per_row) for term in terms)
            references = sum(term.student_scores.numel() for term in terms)
            agreement = sum(
                float(spearman(term.student_scores.detach(), term.teacher_scores).sum())
                for term in terms
            )
            entropy = sum(float(term.teacher_entropy().sum()) for term in terms)
        return NeCoStats(
            loss=float(loss.detach()),
            valid_pairs=valid_pairs,
            total_pairs=total_pairs,
            num_references=references / rows,
            rank_agreement=agreement / rows,
            teacher_entropy=entropy / rows,
            queue_full=None if self.queue is None else self.queue.is_full(0),
        )


def _overlapping_pairs(boxes: Tensor, teacher_views: int) -> list[list[list[bool]]]:
    """``[c][v][b]``: whether teacher view ``c``'s crop overlaps view ``v``'s in image ``b``.

    One host transfer for all pairs, so that the pair loop needs none.
    """
    shared = intersect(boxes[:, :teacher_views, None], boxes[:, None, :])  # (B, C, V, 4)
    return is_nonempty(shared).permute(1, 2, 0).tolist()


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


def _check_fraction(references: str, fraction: float | None) -> float | None:
    if references != "fraction":
        if fraction is not None:
            raise ValueError(
                f"reference_fraction applies to references='fraction', not {references!r}."
            )
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(
            f"references='fraction' needs reference_fraction in (0, 1] but it is {fraction!r}."
        )
    if not 0 < fraction <= 1:
        raise ValueError(f"reference_fraction must be in (0, 1] but is {fraction!r}.")
    return float(fraction)


def _check_num_references(references: str, count: int | None, roi_size: int) -> int | None:
    if references in ("per_image", "fraction"):
        if count is not None:
            raise ValueError(
                f"num_references applies to references='count' or 'queue', not {references!r} "
                f"(per_image uses roi_size**2 = {roi_size**2}, fraction uses f * B * N)."
            )
        return roi_size**2 if references == "per_image" else None
    if count is None:
        if references == "count":
            raise ValueError("references='count' needs num_references (an int >= 1).")
        return roi_size**2
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_references must be an int >= 1 but is {count!r}.")
    return count


def _check_views(
    student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], boxes: Tensor
) -> tuple[int, int]:
    """Validate the inputs of ``NeCoLoss.forward``; return ``(B, V)``."""
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
