"""The cross-entropy between two soft permutations that the fused sort+CE kernels compute.

``CrossEntropySettings`` says what a fused kernel sorts and compares; ``cross_entropy_over_ranks``
is the same quantity on materialised permutations: the definition the kernels are checked
against, and the CE of ``neco_loss.permutation_losses``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neco_loss.sorting.kernels.plan import SortSettings

EPSILON: float | None = None
"""Default clamp of a probability before its log: ``None``, the dtype's smallest normal number.

The reference code takes ``log(Q_s)`` unclamped (``src/neco.py``, ``compute_knn_subloss``). A
probability that underflows to exactly 0 (logistic relaxations, odd-even networks, steepness
1000) makes that ``-inf`` and the loss NaN. Clamping at ``torch.finfo(dtype).tiny`` (1.2e-38 in
float32, 2.2e-308 in float64) changes nothing above it, so the default equals the reference
loss wherever that is finite, and turns ``log(0)`` into a large finite number. A larger epsilon
(e.g. 1e-3 for logistic relaxations in float32, ``docs/loss.md``) is a deliberate bias.
"""


def log_floor(epsilon: float | None, dtype: torch.dtype) -> float:
    """The clamp applied before a log: ``epsilon``, or ``dtype``'s smallest normal for ``None``."""
    return torch.finfo(dtype).tiny if epsilon is None else epsilon


def cross_entropy_over_ranks(
    q_student: Tensor,
    q_teacher: Tensor,
    *,
    top_k: int | None = None,
    teacher_to_student: bool = True,
    student_to_teacher: bool = False,
    epsilon: float | None = EPSILON,
) -> Tensor:
    """Per-row CE of two soft permutations: mean over elements of the sum over ranks.

    Args:
        q_student: ``(rows, n, n)`` student permutations (carries the gradient).
        q_teacher: ``(rows, n, n)`` teacher permutations (used as they are).
        top_k: Compare only ranks ``n - k .. n - 1`` (``None``: all).
        teacher_to_student: Include ``-sum_rank Q_t log max(Q_s, epsilon)`` (reference code).
        student_to_teacher: Include ``-sum_rank Q_s log max(Q_t, epsilon)``.
        epsilon: Clamp of probabilities before their log (``None``: see ``EPSILON``).

    Returns:
        ``(rows,)``.

    """
    n = q_student.shape[-1]
    floor = log_floor(epsilon, q_student.dtype)
    if top_k is not None:
        q_student, q_teacher = q_student[..., n - top_k :], q_teacher[..., n - top_k :]
    per_element = q_student.new_zeros(q_student.shape[:2])
    if teacher_to_student:
        per_element = per_element - (q_teacher * q_student.clamp_min(floor).log()).sum(-1)
    if student_to_teacher:
        per_element = per_element - (q_student * q_teacher.clamp_min(floor).log()).sum(-1)
    return per_element.mean(dim=1)


@dataclass(frozen=True)
class CrossEntropySettings:
    """What a fused sort+CE kernel sorts and compares.

    Attributes:
        network: Sorting network name.
        relaxation: Swap-probability name.
        steepness_student: Inverse temperature of the student's sort.
        steepness_teacher: Inverse temperature of the teacher's sort.
        art_lambda: Exponent of ``logistic_phi``.
        top_k: Compare only the ``k`` highest ranks (``None``: all).
        teacher_to_student: Include ``CE(Q_t, Q_s)``.
        student_to_teacher: Include ``CE(Q_s, Q_t)``.
        epsilon: Clamp of probabilities before their log (``None``: see ``EPSILON``).

    """

    network: str
    relaxation: str
    steepness_student: float
    steepness_teacher: float
    art_lambda: float = 0.25
    top_k: int | None = None
    teacher_to_student: bool = True
    student_to_teacher: bool = False
    epsilon: float | None = EPSILON

    def sort(self, of: str) -> SortSettings:
        """The settings of the ``"student"`` or the ``"teacher"`` sort."""
        steepness = self.steepness_student if of == "student" else self.steepness_teacher
        return SortSettings(self.network, self.relaxation, steepness, self.art_lambda)

    def log_floor(self, dtype: torch.dtype) -> float:
        """The clamp before the log for scores of ``dtype``."""
        return log_floor(self.epsilon, dtype)

    def first_rank(self, n: int) -> int:
        """First compared rank for ``n`` references (``n - top_k``, or 0)."""
        return n - (self.top_k or n)

    def on_permutations(self, q_student: Tensor, q_teacher: Tensor) -> Tensor:
        """The fused kernels' ``(rows,)`` result, computed from materialised permutations."""
        return cross_entropy_over_ranks(
            q_student,
            q_teacher,
            top_k=self.top_k,
            teacher_to_student=self.teacher_to_student,
            student_to_teacher=self.student_to_teacher,
            epsilon=self.epsilon,
        )
