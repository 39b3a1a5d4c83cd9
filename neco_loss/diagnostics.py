"""Numbers worth logging next to the NeCo loss: how alike student and teacher rank references."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class NeCoStats:
    """Diagnostics of one ``NeCoLoss`` call.

    Attributes:
        loss: The loss value.
        valid_pairs: (image, view pair) combinations whose crops overlap and entered the loss.
        total_pairs: All (image, view pair) combinations.
        num_references: References per query ``R`` (the mean if pairs differed).
        rank_agreement: Mean Spearman correlation between the student's and the teacher's hard
            ranking of the references (1 = same order, 0 = unrelated).
        teacher_entropy: Mean entropy (nats) of a row of ``Q_t``: 0 for a hard permutation,
            ``log R`` for a uniform one; falls as the teacher's steepness rises.
        queue_full: Whether the reference queue was full (``None`` without a queue).

    """

    loss: float
    valid_pairs: int
    total_pairs: int
    num_references: float
    rank_agreement: float
    teacher_entropy: float
    queue_full: bool | None = None

    def as_dict(self, prefix: str = "neco/") -> dict[str, float]:
        """Flat ``{name: value}`` for loggers (``queue_full`` as 0/1, left out without queue)."""
        values = {
            "loss": self.loss,
            "valid_pair_fraction": self.valid_pairs / max(1, self.total_pairs),
            "num_references": self.num_references,
            "rank_agreement": self.rank_agreement,
            "teacher_entropy": self.teacher_entropy,
        }
        if self.queue_full is not None:
            values["queue_full"] = float(self.queue_full)
        return {prefix + name: value for name, value in values.items()}


def hard_ranks(scores: Tensor) -> Tensor:
    """``(rows, n)`` rank of every entry in ascending order (ties broken by position)."""
    return scores.argsort(dim=-1, stable=True).argsort(dim=-1)


def spearman(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """``(rows,)`` Spearman correlation of two ``(rows, n)`` score matrices (1 when ``n == 1``)."""
    n = scores_a.shape[-1]
    if n == 1:
        return scores_a.new_ones(scores_a.shape[0])
    difference = (hard_ranks(scores_a) - hard_ranks(scores_b)).to(scores_a.dtype)
    return 1 - 6 * difference.square().sum(dim=-1) / (n * (n * n - 1))


def permutation_entropy(q: Tensor) -> Tensor:
    """``(rows,)`` mean over elements of the entropy over ranks of ``q (rows, n, n)``."""
    return -(q * q.clamp_min(torch.finfo(q.dtype).tiny).log()).sum(dim=-1).mean(dim=-1)


class ComparedRows(Protocol):
    """Sorted rows of one ``R`` (``neco_loss.functional.NeCoTerms``)."""

    @property
    def per_row(self) -> Tensor:
        """``(rows,)`` loss of each row."""
        ...

    @property
    def student_scores(self) -> Tensor:
        """``(rows, R)`` student similarities."""
        ...

    @property
    def teacher_scores(self) -> Tensor:
        """``(rows, R)`` teacher similarities."""
        ...

    def teacher_entropy(self) -> Tensor:
        """``(rows,)`` entropy of each row of ``Q_t``."""
        ...


def loss_stats(
    loss: Tensor,
    terms: Sequence[ComparedRows],
    valid_pairs: int,
    total_pairs: int,
    queue_full: bool | None,
) -> NeCoStats:
    """``NeCoStats`` of one ``NeCoLoss`` call from its sorted rows (means over all rows)."""
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
        queue_full=queue_full,
    )
