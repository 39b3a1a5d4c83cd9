"""Reference patches: the set every query patch is ranked against.

Strategies (``NeCoLoss(references=...)``):

- ``"per_image"`` (reference code): the pair's aligned patches of the whole batch are shuffled
  and split into ``B`` disjoint groups of ``R = roi_size**2``, one group per image.
- ``"fraction"``: a random fraction ``f`` of the batch's aligned patches, ``R = f * B * N``,
  shared by every query (the paper's ``R = f * B * N``; our fraction ablation); with
  ``images="intra"``/``"inter"`` a fraction of the allowed patches (``f * N``,
  ``f * (B - 1) * N``).
- ``"count"``: a fixed number ``R`` of random patches of the batch, shared by every query.
- ``"queue"``: a FIFO of teacher tokens (reference DINOv2 configs: 8192 per global view); until
  it is full the ``per_image`` strategy is used.

``images`` restricts where an image's references come from (paper Table 5c): ``"any"`` image of
the batch, the same image only (``"intra"``) or other images only (``"inter"``); with
``"intra"``/``"inter"`` references are drawn per image. References carry the gradient of the
patches they are drawn from (none from an EMA teacher; the student's in the reference code's
``use_teacher: False`` ablation); queued tokens never do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from neco_loss.checks import check_choice
from neco_loss.reference_queue import DEFAULT_QUEUE_LENGTH, ReferenceQueue, cpu_randperm

REFERENCE_STRATEGIES = ("per_image", "fraction", "count", "queue")
REFERENCE_IMAGES = ("any", "intra", "inter")
REFERENCE_SOURCES = ("teacher", "student")


def all_gather(tensor: Tensor) -> tuple[Tensor, ...]:
    """``tensor`` from every process in rank order (``torch.distributed``; no gradient).

    Returns ``(tensor,)`` when no process group is initialised. Shapes must be equal everywhere.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return (tensor,)
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor)
    return tuple(parts)


def per_image_references(
    pool: Tensor,
    count: int,
    images: str = "any",
    generator: torch.Generator | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """Draw ``count`` references for every image from a batch of patches, without replacement.

    Args:
        pool: ``(B, N, D)`` the batch's aligned patches.
        count: References per image ``R``.
        images: ``"any"``: from the whole batch, and for ``count == N`` every patch is used
            exactly once (the reference code's shuffle-and-split); ``"intra"``: from the image's
            own patches; ``"inter"``: from the other images' patches.
        generator: CPU generator for reproducible draws, or ``None`` for the global RNG.
        keep: ``(B, N)`` bool, for ``images="any"`` only: draw from these patches alone,
            repeated in order to fill ``B * N`` places before the shuffle (the reference code's
            ``loss_mask: fg/bg`` selection, ``knn_loss``); at least one must be True.

    Returns:
        ``(B, R, D)`` references, with the pool's gradient (detach the pool for constants).

    Raises:
        ValueError: If there are fewer candidate patches than ``count``.

    """
    batch, patches, _ = pool.shape
    flat = pool.flatten(0, 1)  # (B * N, D)
    if keep is not None:
        if images != "any":
            raise ValueError(f"keep applies to images='any', not {images!r}.")
        chosen = flat[keep.flatten()]  # reference: filtered.repeat(round(BN / F) + 1)[:BN]
        flat = chosen.repeat(batch * patches // len(chosen) + 1, 1)[: batch * patches]
    available = {"any": batch * patches, "intra": patches, "inter": (batch - 1) * patches}[images]
    if count > available or (images == "any" and count * batch > batch * patches):
        raise ValueError(
            f"cannot draw {count} references per image with images={images!r} from a batch of "
            f"{batch} images x {patches} patches ({available} candidates per image"
            + (", and 'any' draws disjoint sets" if images == "any" else "")
            + "); use fewer references or a larger batch."
        )
    if images == "any":
        return flat[cpu_randperm(batch * patches, generator, pool.device)[: batch * count]].view(
            batch, count, -1
        )
    owner = torch.arange(batch, device=pool.device).repeat_interleave(patches)  # (B * N,)
    own = owner[None, :] == torch.arange(batch, device=pool.device)[:, None]  # (B, B * N)
    allowed = own if images == "intra" else ~own
    keys = torch.rand(batch, batch * patches, generator=generator).to(pool.device)
    chosen = keys.masked_fill(~allowed, -1.0).topk(count, dim=1).indices  # (B, R)
    return flat[chosen]


def shared_references(pool: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``count`` references shared by every query from a batch of patches.

    Args:
        pool: ``(B, N, D)`` the batch's aligned patches.
        count: Number of references ``R <= B * N``.
        generator: CPU generator, or ``None`` for the global RNG.

    Returns:
        ``(R, D)`` references, with the pool's gradient.

    Raises:
        ValueError: If ``count > B * N``.

    """
    flat = pool.flatten(0, 1)
    if count > flat.shape[0]:
        raise ValueError(
            f"cannot draw {count} references from {flat.shape[0]} patches "
            f"({pool.shape[0]} images x {pool.shape[1]}); use fewer references or a larger batch."
        )
    return flat[cpu_randperm(flat.shape[0], generator, pool.device)[:count]]


def fraction_count(fraction: float, batch: int, patches: int, images: str = "any") -> int:
    """``R``: a fraction of the candidate patches, at least 1.

    ``round(f * B * N)`` for ``images="any"`` (the paper's ``R = f * B * N``), of the image's
    own ``N`` patches for ``"intra"`` and of the other images' ``(B - 1) * N`` for ``"inter"``.
    """
    candidates = {"any": batch, "intra": 1, "inter": batch - 1}[images] * patches
    return max(1, round(fraction * candidates))


class ReferencePolicy:
    """Where every query's references come from: the strategy, its queue, its draws.

    ``NeCoLoss`` owns one; its arguments are the loss's reference options (see ``NeCoLoss``).
    The policy holds the queue (``references="queue"``), the private generator of the draws
    (``seed``) and the cross-process ``gather``, and gathers at most once per pair.

    Raises:
        ValueError: For an unknown strategy, image or source choice, a fraction or count that
            does not fit the strategy, or a queue with images other than ``"any"``.

    """

    def __init__(
        self,
        strategy: str = "per_image",
        roi_size: int = 7,
        *,
        fraction: float | None = None,
        count: int | None = None,
        queue_length: int = DEFAULT_QUEUE_LENGTH,
        images: str = "any",
        source: str = "teacher",
        seed: int | None = None,
        gather: Callable[[Tensor], Sequence[Tensor]] | None = None,
    ) -> None:
        check_choice(strategy, "references", REFERENCE_STRATEGIES)
        check_choice(images, "reference_images", REFERENCE_IMAGES)
        check_choice(source, "reference_source", REFERENCE_SOURCES)
        if strategy == "queue" and images != "any":
            raise ValueError(
                f"reference_images={images!r} needs references from the batch; the "
                "queue mixes images: use references='per_image', 'fraction' or 'count'."
            )
        self.strategy = strategy
        self.fraction = _check_fraction(strategy, fraction)
        self.count = _check_count(strategy, count, roi_size)
        self.images = images
        self.source = source
        self.queue = ReferenceQueue(queue_length) if strategy == "queue" else None
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.gather = gather

    def push(
        self,
        student_maps: Sequence[Tensor],
        teacher_maps: Sequence[Tensor],
        selected: list[Tensor] | None,
    ) -> None:
        """Queue every teacher view's tokens (reference: before the loss of the step)."""
        if self.queue is None:
            return
        source_maps = teacher_maps if self.source == "teacher" else student_maps
        for view in range(len(teacher_maps)):
            tokens = source_maps[view].flatten(2).transpose(1, 2).detach()  # (B, h * w, D)
            keep = None if selected is None else selected[view].flatten(1)  # (B, h * w)
            if self.gather is not None:  # every process queues every process's tokens
                tokens = torch.cat(list(self.gather(tokens.contiguous())))
            self.queue.push(view, tokens, len(teacher_maps), self.generator, keep)

    def is_queued(self, teacher_view: int) -> bool:
        """Whether the references of ``teacher_view`` come from its full queue."""
        return self.queue is not None and self.queue.is_full(teacher_view)

    def pool(self, teacher: Tensor, student: Tensor) -> Tensor:
        """The aligned patches references are drawn from (``reference_source``).

        Teacher patches keep their gradient, if any: the reference code's ``use_teacher:
        False`` ablation passes a second student forward as the teacher, and its references
        carry gradient; an EMA teacher has none. Student patches are detached.
        """
        return teacher if self.source == "teacher" else student.detach()

    def reference_count(self, batch: int, patches: int) -> int:
        """``R`` per query for ``batch`` images of ``patches`` aligned patches each."""
        if self.strategy == "fraction":
            assert self.fraction is not None  # set by the constructor
            return fraction_count(self.fraction, batch, patches, self.images)
        return self.count or patches

    def draw(self, teacher_view: int, pool: Tensor, keep: Tensor | None = None) -> Tensor:
        """References for a pool ``(B, N, D)`` of valid images: ``(B, R, D)`` or ``(R, D)``.

        ``keep`` ``(B, N)`` restricts batch draws to the patches ``loss_mask`` selects.
        """
        batch, patches, _ = pool.shape
        count = self.reference_count(batch, patches)
        if self.is_queued(teacher_view):
            assert self.queue is not None  # is_queued
            return self.queue.sample(teacher_view, batch, count, self.generator).to(pool.dtype)
        if self.strategy in ("per_image", "queue"):  # the queue falls back to per_image
            return per_image_references(pool, patches, self.images, self.generator, keep)
        if self.images == "any":
            return shared_references(pool, count, self.generator)
        return per_image_references(pool, count, self.images, self.generator)

    def check_gathered_shapes(
        self, batch: int, patches: int, dim: int, device: torch.device
    ) -> None:
        """Once per call with ``gather``: every process must draw from pools of one shape.

        Raises:
            ValueError: If the processes' ``(B, N, D)`` differ (unequal per-process batches).

        """
        if self.gather is None:
            return
        shape = torch.tensor([batch, patches, dim], device=device)
        shapes = torch.stack(list(self.gather(shape)))
        if not bool((shapes == shape).all()):
            raise ValueError(
                "gather needs the same (B, N, D) on every process but got "
                f"{shapes.tolist()}; use equal per-process batches (drop_last=True)."
            )

    def draw_gathered(self, teacher_view: int, pool: Tensor, valid: Tensor) -> Tensor:
        """References of this process's valid images when drawing across processes.

        They are drawn for the valid images of every process, as one process would draw them
        for the whole batch, and this process keeps its images': ``(B_valid, R, D)`` or
        ``(R, D)``. One gather: the pool with each image's validity as an extra channel (the
        shapes were checked once per call, ``check_gathered_shapes``).
        """
        assert self.gather is not None  # only called with gather
        flags = valid.to(pool.dtype)[:, None, None].expand(-1, pool.shape[1], 1)
        gathered = torch.cat(list(self.gather(torch.cat([pool, flags], dim=2).contiguous())))
        pools, valids = gathered[..., :-1], gathered[:, 0, -1].bool()  # (world * B, N, D)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        counts = valids.view(-1, len(valid)).sum(dim=1)  # valid images per process
        offset, mine = int(counts[:rank].sum()), int(counts[rank])
        references = self.draw(teacher_view, pools[valids])
        return references if references.dim() == 2 else references[offset : offset + mine]

    def check_batch(self, batch: int, patches: int) -> None:
        """Raise if a batch of ``batch`` images of ``patches`` aligned patches cannot feed it.

        Raises:
            ValueError: If the strategy needs more candidate patches than such a batch has, or
                the queue is shorter than one step's draw.

        """
        available = {"any": batch, "intra": 1, "inter": batch - 1}[self.images] * patches
        count = self.reference_count(batch, patches)
        if self.strategy != "queue" and (available < 1 or count > available):
            raise ValueError(
                f"references={self.strategy!r} with reference_images={self.images!r} draws "
                f"{count} references per image, but a batch of {batch} images x {patches} "
                f"aligned patches offers {available}; use a larger batch or fewer references."
            )
        if self.queue is not None and batch * count > self.queue.length:
            raise ValueError(
                f"queue_length {self.queue.length} is shorter than one step's draw of {count} "
                f"references x {batch} images; use a longer queue or a smaller batch."
            )


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


def _check_count(references: str, count: int | None, roi_size: int) -> int | None:
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
