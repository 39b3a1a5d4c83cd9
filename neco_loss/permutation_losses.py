"""Losses between the student's and the teacher's soft permutation matrices.

A soft permutation ``Q (rows, n, n)`` holds in ``Q[r, i, j]`` the probability that reference
``i`` lands at rank ``j`` when row ``r``'s similarities are sorted ascending (rank 0 = least
similar, rank ``n - 1`` = nearest neighbour). Every loss here returns one value per row: the mean
over the elements ``i`` of a sum (CE) or mean (L1 / L2) over the ranks ``j``.
"""

from __future__ import annotations

from torch import Tensor

from neco_loss.checks import check_choice, check_positive_finite
from neco_loss.sorting.kernels.cross_entropy import EPSILON, cross_entropy_over_ranks

LOSSES = ("ce", "l1", "l2")
DIRECTIONS = ("teacher_to_student", "student_to_teacher", "both")


def check_top_k(top_k: int | None, n: int | None = None) -> int | None:
    """Return ``top_k`` if it is ``None`` or an integer in ``[1, n]``.

    Raises:
        TypeError: If ``top_k`` is not an integer.
        ValueError: If it is < 1 or > ``n`` (the number of references).

    """
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int or None but is {type(top_k).__name__}: {top_k!r}.")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 but is {top_k}.")
    if n is not None and top_k > n:
        raise ValueError(f"top_k must be <= the number of references R = {n} but is {top_k}.")
    return top_k


def check_loss_options(loss: str, direction: str, top_k: int | None, epsilon: float | None) -> None:
    """Raise unless the comparison options are valid (``top_k`` checked against R later).

    Raises:
        ValueError: For unknown names, L1/L2 with a CE direction other than the default, or an
            epsilon that is neither ``None`` nor finite and positive.
        TypeError: If ``top_k`` is not an integer or ``None``.

    """
    check_choice(loss, "loss", LOSSES)
    check_choice(direction, "direction", DIRECTIONS)
    if epsilon is not None:
        check_positive_finite(epsilon, "epsilon")
    check_top_k(top_k)
    if loss != "ce" and direction != "teacher_to_student":
        raise ValueError(
            f"direction={direction!r} applies to loss='ce' only; loss={loss!r} is symmetric."
        )


def permutation_loss(
    q_student: Tensor,
    q_teacher: Tensor,
    *,
    loss: str = "ce",
    direction: str = "teacher_to_student",
    top_k: int | None = None,
    epsilon: float | None = EPSILON,
) -> Tensor:
    """Per-row loss between soft permutations (reference code: ``-sum_rank Q_t log Q_s``).

    Args:
        q_student: ``(rows, n, n)`` student soft permutations (carries the gradient).
        q_teacher: ``(rows, n, n)`` teacher soft permutations, treated as constants.
        loss: ``"ce"`` cross-entropy over ranks (reference code), ``"l1"`` mean absolute or
            ``"l2"`` mean squared difference of the entries (our L1/L2 ablation).
        direction: For ``"ce"`` only: ``"teacher_to_student"`` = ``CE(Q_t, Q_s)`` (reference
            code), ``"student_to_teacher"`` = ``CE(Q_s, Q_t)``, ``"both"`` = their sum (the
            paper's formula). L1 and L2 are symmetric and accept only the default.
        top_k: Compare only the ``k`` highest ranks, i.e. the ``k`` nearest references
            (similarities are sorted ascending, so these are ranks ``n - k .. n - 1``): the
            paper's Table 9a. ``None`` compares all ``n`` ranks.
        epsilon: Probabilities are clamped to ``>= epsilon`` before their log, so the loss is
            finite for every legal input; ``None`` (default) clamps at the dtype's smallest
            normal number, which leaves every nonzero probability exact (see ``EPSILON``).

    Returns:
        ``(rows,)``: the mean over elements of the sum over ranks (CE) or the mean over elements
        and ranks (L1, L2).

    Raises:
        ValueError: For unknown names, shapes that differ or are not ``(rows, n, n)``,
            ``top_k`` outside ``[1, n]``, L1/L2 with another direction, or a bad epsilon.

    """
    check_loss_options(loss, direction, top_k, epsilon)
    if q_student.dim() != 3 or q_student.shape[1] != q_student.shape[2]:
        raise ValueError(f"q_student must be (rows, n, n) but has shape {tuple(q_student.shape)}.")
    if q_teacher.shape != q_student.shape:
        raise ValueError(
            f"q_teacher must have q_student's shape {tuple(q_student.shape)} but has shape "
            f"{tuple(q_teacher.shape)}."
        )
    n = q_student.shape[-1]
    check_top_k(top_k, n)
    q_teacher = q_teacher.detach()
    if loss == "ce":
        return cross_entropy_over_ranks(
            q_student,
            q_teacher,
            top_k=top_k,
            teacher_to_student=direction in ("teacher_to_student", "both"),
            student_to_teacher=direction in ("student_to_teacher", "both"),
            epsilon=epsilon,
        )
    if top_k is not None:
        q_student, q_teacher = q_student[..., n - top_k :], q_teacher[..., n - top_k :]
    if loss == "l1":
        return (q_student - q_teacher).abs().mean(dim=(1, 2))
    return (q_student - q_teacher).square().mean(dim=(1, 2))
