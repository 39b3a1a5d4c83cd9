"""The ROI-aligned token pairs every dense objective compares, as NeCo pairs its crops.

Every teacher global view ``c`` is paired with every student view ``v != c`` (the pairs of
``NeCoLoss``); both maps are ROI-aligned on the intersection of the two crops
(``geometry.align_checked_pair``) and the images whose crops overlap are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neco_loss.geometry import align_checked_pair
from neco_loss.loss_inputs import LossInputs


def aligned_token_pairs(inputs: LossInputs, roi_size: int) -> tuple[Tensor, Tensor]:
    """The aligned tokens of every overlapping (image, pair), stacked.

    Args:
        inputs: Checked inputs (``loss_inputs.check_loss_inputs``).
        roi_size: Side of the aligned grid (``N = roi_size**2`` tokens per pair).

    Returns:
        ``(teacher, student)`` tokens, each ``(P, N, D)`` for the ``P`` overlapping (image,
        pair) combinations, teacher views outer, student views inner, images innermost.

    Raises:
        ValueError: If no pair of crops overlaps in any image.

    """
    teachers: list[Tensor] = []
    students: list[Tensor] = []
    for teacher_view, teacher_map in enumerate(inputs.teacher_maps):
        for student_view, student_map in enumerate(inputs.student_maps):
            if student_view == teacher_view:
                continue
            teacher, student, valid = align_checked_pair(
                teacher_map,
                student_map,
                inputs.boxes[:, teacher_view],
                inputs.boxes[:, student_view],
                roi_size,
                (inputs.extents[teacher_view], inputs.extents[student_view]),
            )
            teachers.append(teacher[valid])
            students.append(student[valid])
    teacher_tokens, student_tokens = torch.cat(teachers), torch.cat(students)
    if len(teacher_tokens) == 0:
        pairs = inputs.batch * len(inputs.teacher_maps) * (inputs.views - 1)
        raise ValueError(
            f"no crop pair overlaps in any of the {inputs.batch} images ({pairs} pairs): check "
            "the boxes (original-image pixels, (x0, y0, x1, y1))."
        )
    return teacher_tokens, student_tokens
