"""The reference queue: FIFO tokens of earlier steps as references (``references="queue"``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_QUEUE_LENGTH = 8192  # reference DINOv2 configs: queue_length: 8192
QUEUE_PUSH_PER_IMAGE = 10  # reference code update_queue: min(bs * 10, queue_length) per step


def cpu_randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``torch.randperm`` drawn on the CPU (seeded by a CPU generator) and moved to ``device``."""
    return torch.randperm(n, generator=generator).to(device)


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
        chosen = tokens[cpu_randperm(tokens.shape[0], generator, tokens.device)[:count]]
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
        chosen = cpu_randperm(self.length, generator, self.tokens.device)[: batch * count]
        return self.tokens[view][chosen].view(batch, count, -1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The buffers' shapes are set by the first push: take them from the checkpoint.
        for name in ("tokens", "filled"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._filled_on_host = self.filled.tolist()
