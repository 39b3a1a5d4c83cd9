"""``DenseObjective``: what every dense loss of a training step offers the trainer.

``NeCoLoss`` and the alternatives of ``neco_loss.objectives`` are called alike (student maps,
teacher maps, boxes; keywords ``crop_sizes``, ``foreground``, ``compute_stats``) and share
this interface, so that the trainer, the lightly module and the solo-learn method run any of
them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from neco_loss.diagnostics import NeCoStats


class DenseObjective(nn.Module):
    """A dense loss between a student's views and a teacher's global views.

    Attributes:
        loss_mask: Which query patches the loss compares (``"all"`` unless it takes masks).
        last_stats: Diagnostics of the last call that computed them (``None``: none).

    """

    loss_mask: str = "all"
    last_stats: NeCoStats | None = None

    @property
    def generator(self) -> torch.Generator | None:
        """The private generator of the loss's random draws (checkpointed), or ``None``."""
        return None

    def check_batch(self, batch: int) -> None:
        """Refuse (``ValueError``) a batch of ``batch`` images the loss cannot use."""

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
        """The scalar loss; arguments as ``NeCoLoss.forward``."""
        raise NotImplementedError
