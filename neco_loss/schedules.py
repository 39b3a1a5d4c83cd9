"""Per-step cosine schedules (reference: ``cosine_scheduler`` of the NeCo / DINO code)."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps`` along half a cosine."""
    progress = min(max(step / max(1, total_steps), 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
