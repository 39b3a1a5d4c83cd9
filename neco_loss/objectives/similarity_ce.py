"""Similarity cross-entropy: NeCo without the sorting (the reviewers' "is the sorting needed?").

The same pairs, ROI-aligned tokens and references as ``NeCoLoss``; instead of soft-sorting the
similarities to the references and comparing the soft permutations, each query patch compares
the teacher's softmax distribution over its similarities with the student's:
``CE(softmax(t / T), softmax(s / T)) = -sum_r softmax(t / T)_r log softmax(s / T)_r``, as
DINO/iBOT compare their teacher's and student's distributions over prototypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from neco_loss.functional import SortOptions
from neco_loss.loss import NeCoLoss

DEFAULT_TEMPERATURE = 0.1  # DINO's student temperature; cosine similarities lie in [-1, 1]


@dataclass
class SimilarityTerms:
    """What one group of rows computed, for ``diagnostics.loss_stats``.

    Attributes:
        per_row: ``(rows,)`` cross-entropy of each query patch.
        student_scores: ``(rows, R)`` student similarities to the references.
        teacher_scores: ``(rows, R)`` teacher similarities (no gradient).
        temperature: The softmax temperature ``T``.

    """

    per_row: Tensor
    student_scores: Tensor
    teacher_scores: Tensor
    temperature: float

    def teacher_entropy(self) -> Tensor:
        """``(rows,)`` entropy of the teacher's distribution over the references."""
        log_p = torch.log_softmax(self.teacher_scores / self.temperature, dim=-1)
        return -(log_p.exp() * log_p).sum(dim=-1)


class SimilarityCELoss(NeCoLoss):
    """``NeCoLoss`` with the soft sort replaced by a softmax cross-entropy over similarities.

    Args:
        temperature: ``T`` of both softmaxes, > 0.
        **reference_options: ``NeCoLoss``'s options of pairs, references and masks
            (``roi_size``, ``references``, ``reference_fraction``, ``similarity``,
            ``loss_mask``, ``seed``, ``gather``, ...); the sort options do not apply.

    Raises:
        ValueError: For a temperature that is not a positive finite number, or a sort option.

    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, **reference_options: Any) -> None:
        sort_keys = sorted(set(reference_options) & {f.name for f in fields(SortOptions)})
        if sort_keys:
            raise ValueError(
                f"loss keys {sort_keys} are sort options: objective 'similarity_ce' does not "
                "sort (it compares softmax distributions); use objective 'neco' for them."
            )
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not (math.isfinite(temperature) and temperature > 0)
        ):
            raise ValueError(f"temperature must be a finite number > 0 but is {temperature!r}.")
        super().__init__(**reference_options)
        self.temperature = float(temperature)

    def _terms(self, pairs: list[Any]) -> SimilarityTerms:
        """The cross-entropy of every row of the pairs with the same ``R``."""
        student = torch.cat([pair.student for pair in pairs])
        teacher = torch.cat([pair.teacher for pair in pairs]).detach()
        target = torch.softmax(teacher / self.temperature, dim=-1)
        per_row = -(target * torch.log_softmax(student / self.temperature, dim=-1)).sum(-1)
        return SimilarityTerms(per_row, student, teacher, self.temperature)
