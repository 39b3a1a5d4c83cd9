"""The NeCo loss on aligned patch features (functional form).

For every query patch, the similarities to ``R`` reference patches are soft-sorted ascending by
a sorting network; the student's soft permutation ``Q_s`` must match the teacher's ``Q_t``
(Pariza et al., 2024; reference code ``NeCo.knn_loss``).

>>> import torch
>>> student, teacher = torch.randn(2, 49, 16), torch.randn(2, 49, 16)
>>> loss = neco_loss(student, teacher, references=teacher[:, torch.randperm(49)])
>>> loss.shape
torch.Size([])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from neco_loss.checks import check_choice, check_float_tensor, check_positive_finite, compute_dtype
from neco_loss.diagnostics import permutation_entropy
from neco_loss.permutation_losses import (
    EPSILON,
    check_loss_options,
    check_top_k,
    permutation_loss,
)
from neco_loss.sorting import SoftSorter, get_sorter, kernels
from neco_loss.sorting.kernels import CrossEntropySettings
from neco_loss.sorting.sorter import prepare_scores

SIMILARITIES = ("cosine", "euclidean")
REFERENCE_STEEPNESS = 100.0  # reference configs: student_steepness = teacher_steepness = 100


@dataclass(frozen=True)
class SortOptions:
    """How scores become soft permutations and how those are compared.

    The one declaration of the sort options: ``neco_loss``, ``NeCoLoss`` and the training
    config take the same names with these defaults (the reference code's).

    Attributes:
        network: Sorting network (``neco_loss.sorting.NETWORKS``: ``"bitonic"``,
            ``"bitonic_padded"``, ``"odd_even"``).
        steepness: ``(student, teacher)`` inverse temperatures, or one value for both
            (reference configs: 100, 100).
        relaxation: Swap-probability name (``neco_loss.sorting.RELAXATIONS``; ``"cauchy"`` is
            diffsort 0.2.0's default).
        backend: Sorting backend name (``neco_loss.sorting.BACKENDS``: ``"native"``,
            ``"native-python"``, ``"diffsort"``, ``"torchsort"``).
        loss: ``"ce"`` (reference), ``"l1"`` or ``"l2"`` (see ``permutation_loss``).
        direction: CE direction: ``"teacher_to_student"`` (reference code),
            ``"student_to_teacher"`` or ``"both"`` (the paper's formula); CE only.
        top_k: Compare only the ``k`` nearest-neighbour ranks (the highest ranks, since
            similarities are sorted ascending; the paper's Table 9a), or ``None`` for all.
        epsilon: Clamp of probabilities before their log (``None``: the dtype's smallest
            normal, exact above it; see ``neco_loss.permutation_losses.EPSILON``).

    """

    network: str = "bitonic"
    steepness: float | tuple[float, float] = (REFERENCE_STEEPNESS, REFERENCE_STEEPNESS)
    relaxation: str = "cauchy"
    backend: str = "native"
    loss: str = "ce"
    direction: str = "teacher_to_student"
    top_k: int | None = None
    epsilon: float | None = EPSILON

    def __post_init__(self) -> None:
        for steepness in self.steepnesses:
            self.sorter(steepness)
        check_loss_options(self.loss, self.direction, self.top_k, self.epsilon)

    def sorter(self, steepness: float) -> SoftSorter:
        """The configured sorter at ``steepness`` (validates the names)."""
        return get_sorter(
            self.network, backend=self.backend, relaxation=self.relaxation, steepness=steepness
        )

    def check_size(self, n: int) -> None:
        """Raise ``ValueError`` unless the configured sorter sorts ``n`` references."""
        self.sorter(REFERENCE_STEEPNESS)(torch.zeros(1, n))

    @property
    def steepnesses(self) -> tuple[float, float]:
        """``(student, teacher)`` steepness."""
        if isinstance(self.steepness, (tuple, list)):
            if len(self.steepness) != 2:
                raise ValueError(
                    "steepness must be one number or a (student, teacher) pair but is "
                    f"{self.steepness!r}."
                )
            return (
                check_positive_finite(self.steepness[0], "steepness[0] (student)"),
                check_positive_finite(self.steepness[1], "steepness[1] (teacher)"),
            )
        value = check_positive_finite(self.steepness, "steepness")
        return value, value


@dataclass(frozen=True)
class NeCoTerms:
    """What the loss computed, for diagnostics.

    Attributes:
        per_row: ``(rows,)`` loss of each query patch.
        q_student: ``(rows, R, R)`` student soft permutations (with gradient), or ``None`` when
            the fused CE kernel computed the loss without materialising them.
        q_teacher: ``(rows, R, R)`` teacher soft permutations (no gradient), or ``None`` (fused).
        student_scores: ``(rows, R)`` student similarities to the references.
        teacher_scores: ``(rows, R)`` teacher similarities to the references.
        options: The options the terms were computed with.

    """

    per_row: Tensor
    q_student: Tensor | None
    q_teacher: Tensor | None
    student_scores: Tensor
    teacher_scores: Tensor
    options: SortOptions

    def teacher_entropy(self) -> Tensor:
        """``(rows,)`` entropy over ranks of the teacher's permutation, mean over elements."""
        if self.q_teacher is not None:
            return permutation_entropy(self.q_teacher)
        steepness = self.options.steepnesses[1]
        scores = self.teacher_scores.detach().to(compute_dtype(self.teacher_scores.dtype))
        kernel = kernels.kernel_for(scores, self.options.network, self.options.relaxation)
        if kernel is None:
            raise RuntimeError("no fused kernel for the teacher entropy")  # terms came from one
        # CE(Q_t, Q_t) over all ranks, one direction, with permutation_entropy's clamp is the
        # entropy, still fused (whatever top_k and direction the loss itself compares).
        settings = CrossEntropySettings(
            network=self.options.network,
            relaxation=self.options.relaxation,
            steepness_student=steepness,
            steepness_teacher=steepness,
            epsilon=None,
        )
        with torch.no_grad():
            return kernel.sort_cross_entropy(scores, scores, settings)


def similarity_scores(queries: Tensor, references: Tensor, similarity: str = "cosine") -> Tensor:
    """Similarity of every query patch to every reference; higher = nearer for both kinds.

    Args:
        queries: ``(B, N, D)`` features.
        references: ``(B, R, D)`` per-image or ``(R, D)`` shared references.
        similarity: ``"cosine"`` (of L2-renormalised features, the reference configs'
            ``sim_dist: cosine``) or ``"euclidean"`` (negative distance, so that ascending order
            means the same as for cosine; the reference code's ``euclidean`` sorted plain
            distances, the opposite order).

    Returns:
        ``(B, N, R)`` scores.

    """
    check_choice(similarity, "similarity", SIMILARITIES)
    if references.dim() == 2:
        references = references.unsqueeze(0).expand(queries.shape[0], -1, -1)
    if similarity == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(references, dim=-1).transpose(1, 2)
    return -_euclidean_distance(queries, references)


def _euclidean_distance(queries: Tensor, references: Tensor) -> Tensor:
    """``(B, N, R)`` distances with a finite gradient where a query equals a reference."""
    squared = (queries.unsqueeze(2) - references.unsqueeze(1)).square().sum(dim=-1)
    zero = squared == 0
    return torch.where(zero, 0.0, squared.masked_fill(zero, 1.0).sqrt())


def soft_permutation_loss(
    student_scores: Tensor, teacher_scores: Tensor, options: SortOptions
) -> NeCoTerms:
    """Soft-sort both score matrices ascending and compare the permutations row by row.

    With the native backend and a CE loss, a fused kernel (C++ on the CPU, Triton on CUDA)
    sorts both and computes the CE row by row without materialising either permutation
    (``q_student`` and ``q_teacher`` are then ``None``); the values equal the unfused path's.

    Args:
        student_scores: ``(rows, R)`` scores (with gradient).
        teacher_scores: ``(rows, R)`` scores (used without gradient).
        options: Sorting and comparison options.

    Returns:
        The per-row loss and the intermediate tensors.

    Raises:
        TypeError: If the scores are not floating tensors.
        ValueError: If they are not 2-D with ``R >= 1`` columns, hold NaN/Inf, differ in shape,
            or ``top_k > R``.

    """
    student = prepare_scores(student_scores, "student_scores")
    teacher = prepare_scores(teacher_scores.detach(), "teacher_scores").to(student.dtype)
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_scores must have student_scores' shape {tuple(student.shape)} but has "
            f"shape {tuple(teacher.shape)}."
        )
    check_top_k(options.top_k, student.shape[1])
    return compare_valid_scores(student, teacher, options)


def compare_valid_scores(student: Tensor, teacher: Tensor, options: SortOptions) -> NeCoTerms:
    """``soft_permutation_loss`` for scores already checked: no validation, no host sync.

    Args:
        student: ``(rows, R)`` float32/float64 finite scores (with gradient).
        teacher: ``(rows, R)`` same dtype and shape (used without gradient).
        options: Sorting and comparison options, ``top_k <= R``.

    Returns:
        The per-row loss and the intermediate tensors.

    """
    student_steepness, teacher_steepness = options.steepnesses
    teacher = teacher.detach()
    if options.backend == "native" and options.loss == "ce":
        kernel = kernels.kernel_for(student, options.network, options.relaxation)
        if kernel is not None:
            per_row = kernel.sort_cross_entropy(student, teacher, _fused_settings(options))
            return NeCoTerms(per_row, None, None, student, teacher, options)
    with torch.no_grad():
        _, q_teacher = options.sorter(teacher_steepness).sort_valid(teacher)
    _, q_student = options.sorter(student_steepness).sort_valid(student)
    per_row = permutation_loss(
        q_student,
        q_teacher,
        loss=options.loss,
        direction=options.direction,
        top_k=options.top_k,
        epsilon=options.epsilon,
    )
    return NeCoTerms(per_row, q_student, q_teacher, student, teacher, options)


def _fused_settings(options: SortOptions) -> CrossEntropySettings:
    """The loss ``options`` as the fused kernels take them."""
    return CrossEntropySettings(
        network=options.network,
        relaxation=options.relaxation,
        steepness_student=options.steepnesses[0],
        steepness_teacher=options.steepnesses[1],
        top_k=options.top_k,
        teacher_to_student=options.direction in ("teacher_to_student", "both"),
        student_to_teacher=options.direction in ("student_to_teacher", "both"),
        epsilon=options.epsilon,
    )


def check_features(student: Tensor, teacher: Tensor, references: Tensor) -> None:
    """Raise unless the shapes fit ``neco_loss``'s contract (see there)."""
    check_float_tensor(student, "student", dims=3)
    check_float_tensor(teacher, "teacher", dims=3)
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher must have student's shape {tuple(student.shape)} (B, N, D) but has shape "
            f"{tuple(teacher.shape)}."
        )
    if not isinstance(references, Tensor) or references.dim() not in (2, 3):
        shape = tuple(references.shape) if isinstance(references, Tensor) else references
        raise ValueError(f"references must be (B, R, D) or (R, D) but is {shape}.")
    check_float_tensor(references, "references", dims=references.dim())
    batch, _, dim = student.shape
    if references.shape[-1] != dim or (references.dim() == 3 and references.shape[0] != batch):
        expected = f"({batch}, R, {dim}) or (R, {dim})"
        raise ValueError(
            f"references must be {expected} for student {tuple(student.shape)} but has shape "
            f"{tuple(references.shape)}."
        )
    if references.shape[-2] == 0 or student.shape[1] == 0 or batch == 0:
        raise ValueError(
            f"need B, N, R >= 1: student {tuple(student.shape)}, references "
            f"{tuple(references.shape)}."
        )


def neco_loss(  # noqa: D417 (the sort options are documented once, in SortOptions)
    student: Tensor,
    teacher: Tensor,
    references: Tensor,
    *,
    network: str = SortOptions.network,
    steepness: float | tuple[float, float] = SortOptions.steepness,
    relaxation: str = SortOptions.relaxation,
    backend: str = SortOptions.backend,
    similarity: str = "cosine",
    loss: str = SortOptions.loss,
    direction: str = SortOptions.direction,
    top_k: int | None = SortOptions.top_k,
    epsilon: float | None = SortOptions.epsilon,
) -> Tensor:
    """NeCo loss of aligned student and teacher patches against reference patches.

    Defaults reproduce the reference code: cosine similarity, bitonic network with Cauchy
    relaxation at steepness 100 for both, ``-mean_{B, N, R} sum_rank Q_t log Q_s``. The sort
    options ``network``, ``steepness``, ``relaxation``, ``backend``, ``loss``, ``direction``,
    ``top_k`` and ``epsilon`` are documented once, in ``SortOptions``.

    Args:
        student: ``(B, N, D)`` student features; row ``n`` of image ``b`` shows the same image
            region as the teacher's.
        teacher: ``(B, N, D)`` teacher features (no gradient flows into them).
        references: ``(B, R, D)`` per-image or ``(R, D)`` shared reference features (no
            gradient flows into them).
        similarity: ``"cosine"`` or ``"euclidean"`` (see ``similarity_scores``).

    Returns:
        Scalar loss. Half-precision inputs are computed in float32; autocast is disabled inside.

    Raises:
        TypeError: If an input is not a floating tensor.
        ValueError: For shapes that do not fit, NaN/Inf inputs, unknown option names (the message
            lists the valid ones), ``top_k > R`` or a sorting network that does not sort ``R``.

    Examples:
        >>> import torch
        >>> features = torch.randn(4, 49, 256)
        >>> float(neco_loss(features, features, features[0])) > 0
        True

    """
    options = SortOptions(network, steepness, relaxation, backend, loss, direction, top_k, epsilon)
    check_features(student, teacher, references)
    check_top_k(top_k, references.shape[-2])
    with torch.autocast(device_type=student.device.type, enabled=False):
        dtype = compute_dtype(student.dtype)
        references = references.detach().to(dtype)
        student_scores = similarity_scores(student.to(dtype), references, similarity)
        teacher_scores = similarity_scores(teacher.detach().to(dtype), references, similarity)
        terms = compare_valid_scores(
            student_scores.flatten(0, 1), teacher_scores.flatten(0, 1), options
        )
        return terms.per_row.mean()
