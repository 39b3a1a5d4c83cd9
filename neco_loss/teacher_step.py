"""The teacher step, defined once: which forward makes the teacher maps, and their foreground.

NeCo compares the student's maps of every view with *teacher* maps of the global views. The
reference code's ``use_teacher`` has two settings; ``TEACHERS`` names three:

- ``"ema"`` (reference ``use_teacher: True``): the EMA teacher encodes the global views;
- ``"student"`` (``use_teacher: False`` as the reference code runs it): the student encodes the
  global views a second time, with gradient and fresh drop-path, in the same call as the other
  views (one forward per step, as DistributedDataParallel needs);
- ``"student_detached"``: the student's own global maps, detached (no second forward).

With a ``loss_mask``, each teacher view's foreground comes from the CLS attention of the forward
that made its teacher map (the reference code thresholds that forward's attention). The trainer,
lightly's ``NeCo`` module and solo-learn's ``NeCo`` method all call ``teacher_step`` with their
own encoders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from neco_loss.foreground import foreground_masks
from neco_loss.models import recording_cls_attention

TEACHERS = ("ema", "student", "student_detached")

# ``(views, attention) -> (maps, attentions)``: one ``(B, D, h, w)`` map per view and, when
# ``attention`` is asked for, each view's CLS attention ``(B, heads, h, w)`` (else ``None``).
Encoder = Callable[[list[Tensor], bool], tuple[list[Tensor], list[Tensor] | None]]


class StepMaps(NamedTuple):
    """What one step compares (a tuple: ``student, teacher, foreground = step``).

    Attributes:
        student: ``V`` student maps ``(B, D, h, w)``, global views first, with gradient.
        teacher: ``C`` teacher maps of the global views.
        foreground: ``C`` masks ``(B, h, w)`` bool for a ``loss_mask``, else ``None``.

    """

    student: list[Tensor]
    teacher: list[Tensor]
    foreground: list[Tensor] | None


def teacher_step(
    teacher: str,
    views: list[Tensor],
    num_global: int,
    student: Encoder,
    ema: Encoder,
    attention: bool,
    masks: Callable[[Tensor], Tensor] = foreground_masks,
) -> StepMaps:
    """Encode the views with the student and make the teacher maps per ``teacher``.

    Args:
        teacher: One of ``TEACHERS``.
        views: ``V`` views ``(B, 3, s, s)``, the ``num_global`` global views first.
        num_global: Number of global views ``C``.
        student: The student's encoder (called once, with the global views appended for
            ``"student"``).
        ema: The EMA teacher's encoder (called on the global views for ``"ema"`` only).
        attention: Whether the loss needs the foreground (a ``loss_mask`` other than ``all``).
        masks: Turns a teacher view's CLS attention ``(B, heads, h, w)`` into its foreground
            (default: the reference code's ``foreground_masks``).

    Returns:
        The student maps, the teacher maps and their foreground.

    """
    global_views = views[:num_global]
    inputs = views + global_views if teacher == "student" else views
    maps, attentions = student(inputs, attention and teacher != "ema")
    if teacher == "ema":
        teacher_maps, attentions = ema(global_views, attention)
    elif teacher == "student":
        teacher_maps = maps[len(views) :]
        attentions = None if attentions is None else attentions[len(views) :]
    else:
        teacher_maps = [m.detach() for m in maps[:num_global]]
    foreground = None
    if attentions is not None:  # thresholded in float32 whatever autocast the caller runs
        with torch.autocast(attentions[0].device.type, enabled=False):
            foreground = [masks(grid) for grid in attentions[:num_global]]
    return StepMaps(maps[: len(views)], teacher_maps, foreground)


def per_view_encoder(encode: Callable[[Tensor], Tensor], vit: Any) -> Encoder:
    """An ``Encoder`` that calls ``encode`` on one view at a time.

    Args:
        encode: ``(B, 3, s, s) -> (B, D, h, w)``.
        vit: The ViT inside ``encode`` whose CLS attention is recorded
            (``neco_loss.models.recording_cls_attention``).

    """

    def encoder(views: list[Tensor], attention: bool) -> tuple[list[Tensor], list[Tensor] | None]:
        if not attention:
            return [encode(view) for view in views], None
        with recording_cls_attention(vit) as records:
            maps = [encode(view) for view in views]
        return maps, attention_grids(records, maps)

    return encoder


def attention_grids(records: list[Tensor], maps: list[Tensor]) -> list[Tensor]:
    """Recorded ``(B, heads, h * w)`` attentions, one per map, as ``(B, heads, h, w)`` grids."""
    return [
        record.unflatten(-1, tuple(feature_map.shape[2:]))
        for record, feature_map in zip(records, maps, strict=True)
    ]
