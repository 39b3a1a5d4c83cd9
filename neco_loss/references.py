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

from typing import Any

import torch
from torch import Tensor, nn

REFERENCE_STRATEGIES = ("per_image", "fraction", "count", "queue")
REFERENCE_IMAGES = ("any", "intra", "inter")
REFERENCE_SOURCES = ("teacher", "student")
DEFAULT_QUEUE_LENGTH = 8192  # reference DINOv2 configs: queue_length: 8192
QUEUE_PUSH_PER_IMAGE = 10  # reference code update_queue: min(bs * 10, queue_length) per step


def all_gather(tensor: Tensor) -> tuple[Tensor, ...]:
    """``tensor`` from every process in rank order (``torch.distributed``; no gradient).

    Returns ``(tensor,)`` when no process group is initialised. Shapes must be equal everywhere.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return (tensor,)
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor)
    return tuple(parts)


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``torch.randperm`` drawn on the CPU (seeded by a CPU generator) and moved to ``device``."""
    return torch.randperm(n, generator=generator).to(device)


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
        return flat[_randperm(batch * patches, generator, pool.device)[: batch * count]].view(
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
    return flat[_randperm(flat.shape[0], generator, pool.device)[:count]]


def fraction_count(fraction: float, batch: int, patches: int, images: str = "any") -> int:
    """``R``: a fraction of the candidate patches, at least 1.

    ``round(f * B * N)`` for ``images="any"`` (the paper's ``R = f * B * N``), of the image's
    own ``N`` patches for ``"intra"`` and of the other images' ``(B - 1) * N`` for ``"inter"``.
    """
    candidates = {"any": batch, "intra": 1, "inter": batch - 1}[images] * patches
    return max(1, round(fraction * candidates))


class ReferenceQueue(nn.Module):
    """FIFO queues of tokens, one per teacher view (reference code: ``NeCo.queue``).

    Each step ``push`` adds ``min(10 * B, length)`` random tokens of a view, newest first; the
    fill counter counts rows actually written (the reference code's grew twice as fast). The
    buffers are created at the first push and are part of ``state_dict``, so runs resume with
    their queue.

    Args:
        length: Tokens per queue (reference DINOv2 configs: 8192).

    """

    tokens: Tensor
    filled: Tensor

    def __init__(self, length: int = DEFAULT_QUEUE_LENGTH) -> None:
        super().__init__()
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"queue_length must be an int >= 1 but is {length!r}.")
        self.length = length
        self.register_buffer("tokens", torch.empty(0, length, 0))  # (views, length, D)
        self.register_buffer("filled", torch.zeros(0, dtype=torch.long))  # (views,)
        self._filled_on_host: list[int] = []  # ``filled`` read without a device sync

    def is_full(self, view: int) -> bool:
        """Whether queue ``view`` exists and holds ``length`` tokens."""
        return view < len(self._filled_on_host) and self._filled_on_host[view] == self.length

    def push(
        self,
        view: int,
        tokens: Tensor,
        views: int,
        generator: torch.Generator | None = None,
        keep: Tensor | None = None,
    ) -> None:
        """Add a random subset of a view's tokens to its queue.

        Args:
            view: Index of the teacher view, ``0 <= view < views``.
            tokens: ``(B, M, D)`` tokens (detached here).
            views: Number of teacher views (queues), fixed at the first push.
            generator: CPU generator, or ``None`` for the global RNG.
            keep: ``(B, M)`` bool: queue only these tokens (reference ``update_queue`` with
                ``loss_mask: fg/bg``).

        Raises:
            ValueError: If ``views`` or ``D`` differ from those of earlier pushes.

        """
        batch = tokens.shape[0]
        tokens = tokens.detach().flatten(0, 1)  # (B * M, D)
        if keep is not None:
            tokens = tokens[keep.flatten()]
        if self.tokens.shape[0] == 0:
            self.tokens = tokens.new_zeros(views, self.length, tokens.shape[1])
            self.filled = torch.zeros(views, dtype=torch.long, device=tokens.device)
            self._filled_on_host = [0] * views
        if self.tokens.shape[0] != views or self.tokens.shape[2] != tokens.shape[1]:
            raise ValueError(
                f"the queue holds {self.tokens.shape[0]} views of dimension "
                f"{self.tokens.shape[2]} but was given view {view} of {views} with dimension "
                f"{tokens.shape[1]}."
            )
        count = min(QUEUE_PUSH_PER_IMAGE * batch, self.length, tokens.shape[0])
        chosen = tokens[_randperm(tokens.shape[0], generator, tokens.device)[:count]]
        queue = self.tokens[view]  # (length, D), a view into the buffer
        queue[count:] = queue[: self.length - count].clone()
        queue[:count] = chosen.to(queue.dtype)
        self._filled_on_host[view] = min(self._filled_on_host[view] + count, self.length)
        self.filled[view] = self._filled_on_host[view]

    def sample(
        self, view: int, batch: int, count: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``count`` references per image from a full queue, disjoint across images.

        Returns:
            ``(batch, count, D)`` references.

        Raises:
            ValueError: If the queue is not full or holds fewer than ``batch * count`` tokens.

        """
        if not self.is_full(view):
            raise ValueError(f"queue {view} is not full yet; check is_full first.")
        if batch * count > self.length:
            raise ValueError(
                f"queue_length {self.length} is too short for {count} references x {batch} "
                "images; use a longer queue."
            )
        chosen = _randperm(self.length, generator, self.tokens.device)[: batch * count]
        return self.tokens[view][chosen].view(batch, count, -1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The buffers' shapes are set by the first push: take them from the checkpoint.
        for name in ("tokens", "filled"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._filled_on_host = self.filled.tolist()
