"""Per-step cosine schedules (reference: ``cosine_scheduler`` of the NeCo / DINO code)."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps`` along half a cosine."""
    progress = min(max(step / max(1, total_steps), 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def warmup_cosine(
    step: float, warmup_steps: float, total_steps: float, start: float, end: float
) -> float:
    """Linear from ``start`` to 1 over ``warmup_steps``, then ``cosine`` from 1 to ``end``.

    A multiplicative factor (e.g. for ``torch.optim.lr_scheduler.LambdaLR``): applied to each
    parameter group's own learning rate, it keeps the groups' ratios at every step.
    """
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    return cosine(int(step - warmup_steps), int(total_steps - warmup_steps), 1.0, end)
