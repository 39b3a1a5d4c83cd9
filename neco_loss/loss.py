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
from torch import Tensor

from neco_loss.checks import check_choice
from neco_loss.dense_objective import DenseObjective
from neco_loss.diagnostics import ComparedRows, NeCoStats, loss_stats
from neco_loss.functional import (
    SIMILARITIES,
    SortOptions,
    compare_valid_scores,
    similarity_scores,
)
from neco_loss.geometry import REFERENCE_ROI_SIZE, align_checked_pair, overlapping_pairs
from neco_loss.loss_inputs import MASK_FULL, LossInputs, check_loss_inputs, check_loss_mask
from neco_loss.permutation_losses import check_top_k
from neco_loss.reference_queue import DEFAULT_QUEUE_LENGTH
from neco_loss.references import ReferencePolicy
from neco_loss.sorting.networks import sorts_every_input

PERMUTATION_WARNING_BYTES = 8 * 2**30  # warn before a step whose Q_s alone exceeds 8 GiB


class _PairScores(NamedTuple):
    """One pair's ``(rows, R)`` scores and, with ``loss_mask``, each row's ``(rows,)`` weight."""

    student: Tensor
    teacher: Tensor
    weight: Tensor | None


class NeCoLoss(DenseObjective):
    """NeCo loss between a student's views and an EMA teacher's global views.

    Every teacher global view ``c`` is paired with every student view ``v != c``; both patch maps
    are ROI-aligned on the intersection of the two crops (``roi_size x roi_size`` tokens), each
    aligned patch is compared with reference patches, the similarities are soft-sorted, and the
    student's soft permutation is pulled towards the teacher's. The loss is the mean over all
    overlapping (image, pair) combinations, i.e. the reference code's ``mean_c sum_{v != c} /
    (V - 1)`` when every pair overlaps. Pairs whose crops do not overlap are left out and
    counted in ``last_stats``.

    The sort options ``network``, ``steepness``, ``relaxation``, ``backend``, ``loss``,
    ``direction``, ``top_k`` and ``epsilon`` are documented once, in
    ``neco_loss.functional.SortOptions`` (defaults: the reference code's).

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
        similarity: ``"cosine"`` (reference configs) or ``"euclidean"``.
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
        network: str = SortOptions.network,
        steepness: float | tuple[float, float] = SortOptions.steepness,
        relaxation: str = SortOptions.relaxation,
        backend: str = SortOptions.backend,
        similarity: str = "cosine",
        loss: str = SortOptions.loss,
        direction: str = SortOptions.direction,
        top_k: int | None = SortOptions.top_k,
        epsilon: float | None = SortOptions.epsilon,
        seed: int | None = None,
        loss_mask: str = "all",
        patch_size: int | None = None,
        compute_stats: bool = False,
        gather: Callable[[Tensor], Sequence[Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(roi_size, bool) or not isinstance(roi_size, int) or roi_size < 1:
            raise ValueError(f"roi_size must be an int >= 1 but is {roi_size!r}.")
        self.policy = ReferencePolicy(
            references,
            roi_size,
            fraction=reference_fraction,
            count=num_references,
            queue_length=queue_length,
            images=reference_images,
            source=reference_source,
            seed=seed,
            gather=gather,
        )
        check_choice(similarity, "similarity", SIMILARITIES)
        self.options = SortOptions(
            network, steepness, relaxation, backend, loss, direction, top_k, epsilon
        )
        self.roi_size = roi_size
        self.similarity = similarity
        self.compute_stats = compute_stats
        self.loss_mask = check_loss_mask(loss_mask, self.policy)
        if self.policy.count is not None:
            check_top_k(top_k, self.policy.count)
            self.options.check_size(self.policy.count)
        self.queue = self.policy.queue  # a submodule: its buffers are in state_dict ("queue.")
        if patch_size is not None and (
            isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1
        ):
            raise ValueError(f"patch_size must be an int >= 1 or None but is {patch_size!r}.")
        self.patch_size = patch_size
        self.last_stats: NeCoStats | None = None

    @property
    def generator(self) -> torch.Generator | None:
        """The private generator of the reference draws (``seed``), or ``None``."""
        return self.policy.generator

    @property
    def num_references(self) -> int | None:
        """``R`` for fixed-size strategies; ``None`` for ``references="fraction"``."""
        return self.policy.count

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
        inputs = check_loss_inputs(
            student_maps,
            teacher_maps,
            boxes,
            crop_sizes,
            foreground,
            self.loss_mask,
            self.patch_size,
        )
        stats = self.compute_stats if compute_stats is None else compute_stats
        with torch.autocast(device_type=boxes.device.type, enabled=False):
            return self._loss(inputs, stats)

    def _loss(self, inputs: LossInputs, compute_stats: bool) -> Tensor:
        """The loss of checked inputs: every overlapping pair's rows, sorted by ``R``."""
        self.policy.push(inputs.student_maps, inputs.teacher_maps, inputs.selected)
        groups, valid_pairs, compared_pairs = self._scored_pairs(inputs)
        total_pairs = inputs.batch * len(inputs.teacher_maps) * (inputs.views - 1)
        if valid_pairs == 0:
            raise ValueError(
                f"no crop pair overlaps in any of the {inputs.batch} images ({total_pairs} "
                "pairs): check the boxes (original-image pixels, (x0, y0, x1, y1))."
            )
        if not groups:  # loss_mask selected no patch in this batch (the reference: loss 0)
            return torch.stack([m.sum() for m in inputs.student_maps]).sum().float() * 0.0
        terms = [self._terms(pairs) for pairs in groups.values()]
        per_row = torch.cat([term.per_row for term in terms])
        if inputs.selected is None:
            loss = per_row.mean()
        else:  # reference compute_knn_subloss: masked mean per pair, then mean over pairs
            weights = [pair.weight for pairs in groups.values() for pair in pairs]
            loss = (per_row * torch.cat([w for w in weights if w is not None])).sum()
            loss = loss / compared_pairs
        if compute_stats:
            self.last_stats = self._stats(loss, terms, valid_pairs, total_pairs)
        return loss

    def _scored_pairs(self, inputs: LossInputs) -> tuple[dict[int, list[_PairScores]], int, int]:
        """Every (teacher view, student view) pair's scores, grouped by ``R``.

        Returns:
            ``({R: pair scores}, overlapping (image, pair) count, compared pair count)``; the
            pair count divides the masked mean.

        """
        overlaps = overlapping_pairs(inputs.boxes, len(inputs.teacher_maps))  # [c][v][b]
        if self.policy.gather is not None:
            first = inputs.student_maps[0]
            self.policy.check_gathered_shapes(
                inputs.batch, self.roi_size**2, first.shape[1], first.device
            )
        groups: dict[int, list[_PairScores]] = {}
        valid_pairs = compared_pairs = 0
        for teacher_view, teacher_map in enumerate(inputs.teacher_maps):
            for student_view in range(inputs.views):
                overlapping = overlaps[teacher_view][student_view]  # (B,) bools
                if student_view == teacher_view or (
                    not any(overlapping) and self.policy.gather is None
                ):
                    continue
                valid_pairs += sum(overlapping)
                compared_pairs += 1
                scores = self._pair_scores(
                    teacher_view,
                    (teacher_map, inputs.student_maps[student_view]),
                    (inputs.boxes[:, teacher_view], inputs.boxes[:, student_view]),
                    (inputs.extents[teacher_view], inputs.extents[student_view]),
                    overlapping,
                    None if inputs.selected is None else inputs.selected[teacher_view],
                )
                if scores is not None:
                    groups.setdefault(scores.student.shape[-1], []).append(scores)
        return groups, valid_pairs, compared_pairs

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
        if self.policy.gather is None:
            if not all(overlapping):  # keep the overlapping images (host indices)
                kept = [image for image, overlap in enumerate(overlapping) if overlap]
                index = torch.tensor(kept, device=teacher.device)
                teacher, student = teacher[index], student[index]
                keep = None if keep is None else keep[index]
            empty = keep is not None and not bool(keep.any())
            if empty and not self.policy.is_queued(teacher_view):  # reference: skipped before
                return None  # its batch draw
            references = self.policy.draw(teacher_view, self.policy.pool(teacher, student), keep)
            if empty:  # reference: the queue draw happens, the pair's loss is 0
                return None
        else:
            pool = self.policy.pool(teacher, student)
            references = self.policy.draw_gathered(teacher_view, pool, valid)
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

    def _terms(self, pairs: list[_PairScores]) -> ComparedRows:
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
            self.policy.strategy != "fraction"
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
        """Refuse (``ValueError``) a step of ``batch`` images that cannot feed the references.

        ``batch`` counts all processes' images with ``gather``; see
        ``ReferencePolicy.check_batch``.
        """
        self.policy.check_batch(batch, self.roi_size**2)

    def _stats(
        self, loss: Tensor, terms: list[ComparedRows], valid_pairs: int, total_pairs: int
    ) -> NeCoStats:
        queue_full = None if self.queue is None else self.queue.is_full(0)
        return loss_stats(loss, terms, valid_pairs, total_pairs, queue_full)
