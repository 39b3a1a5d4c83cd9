"""``method_kwargs`` of the solo-learn ``NeCo`` method: defaults and validation.

Needs no solo-learn: the method calls ``neco_method_kwargs`` from its
``add_and_assert_specific_cfg``, and tests call it directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neco_loss.checks import check_choice
from neco_loss.functional import REFERENCE_STEEPNESS
from neco_loss.geometry import REFERENCE_ROI_SIZE
from neco_loss.loss import NeCoLoss
from neco_loss.models import HEAD_HIDDEN_DIM, HEAD_OUT_DIM
from neco_loss.references import DEFAULT_QUEUE_LENGTH
from neco_loss.teacher_step import TEACHERS

# NeCoLoss options a solo-learn config may set, with the reference configs' values.
LOSS_DEFAULTS: dict[str, Any] = {
    "roi_size": REFERENCE_ROI_SIZE,
    "references": "per_image",
    "reference_fraction": None,
    "num_references": None,
    "queue_length": DEFAULT_QUEUE_LENGTH,
    "reference_images": "any",
    "reference_source": "teacher",
    "network": "bitonic",
    "steepness": [REFERENCE_STEEPNESS, REFERENCE_STEEPNESS],
    "relaxation": "cauchy",
    "backend": "native",
    "similarity": "cosine",
    "loss": "ce",
    "direction": "teacher_to_student",
    "top_k": None,
    "loss_mask": "all",
}
METHOD_DEFAULTS: dict[str, Any] = {
    "proj_hidden_dim": HEAD_HIDDEN_DIM,
    "proj_output_dim": HEAD_OUT_DIM,
    # Reference: head lr 1e-4 for a backbone lr 1e-5. A ratio, so that it follows solo-learn's
    # scaling of optimizer.lr by batch_size * devices * nodes / 256.
    "head_lr_scale": 10.0,
    "min_overlap": 0.01,  # reference crops: overlap > 1% of the image with earlier global crops
    "gather_references": False,  # reference code: references from this process's batch only
    "teacher": "ema",  # reference use_teacher: True; see neco_loss.teacher_step.TEACHERS
}
DEFAULTS: dict[str, Any] = {**METHOD_DEFAULTS, **LOSS_DEFAULTS}
_POSITIVE_INTS = ("proj_hidden_dim", "proj_output_dim")


def neco_method_kwargs(method_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``method_kwargs`` with defaults filled in, validated.

    Args:
        method_kwargs: The ``method_kwargs`` node of a solo-learn config (a ``DictConfig`` or a
            dict; ``None`` for all defaults).

    Returns:
        A plain dict of every key in ``DEFAULTS``; ``steepness`` as a ``[student, teacher]``
        list.

    Raises:
        ValueError: Naming unknown keys, or a value ``NeCoLoss`` or the method refuses.
        TypeError: If ``method_kwargs`` is not a mapping.

    """
    if method_kwargs is None:
        method_kwargs = {}
    if not isinstance(method_kwargs, Mapping):
        raise TypeError(f"method_kwargs must be a mapping but is {type(method_kwargs).__name__}.")
    unknown = sorted(set(method_kwargs) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown NeCo method_kwargs {unknown}; valid keys are {sorted(DEFAULTS)}."
        )
    kwargs = {**DEFAULTS, **dict(method_kwargs)}
    kwargs["steepness"] = _steepness_pair(kwargs["steepness"])
    for key in _POSITIVE_INTS:
        value = kwargs[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"method_kwargs.{key} must be an int >= 1 but is {value!r}.")
    scale = kwargs["head_lr_scale"]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0:
        raise ValueError(f"method_kwargs.head_lr_scale must be a number > 0 but is {scale!r}.")
    overlap = kwargs["min_overlap"]
    if isinstance(overlap, bool) or not isinstance(overlap, int | float) or not 0 <= overlap < 1:
        raise ValueError(f"method_kwargs.min_overlap must be in [0, 1) but is {overlap!r}.")
    if not isinstance(kwargs["gather_references"], bool):
        raise ValueError(
            f"method_kwargs.gather_references must be true or false but is "
            f"{kwargs['gather_references']!r}."
        )
    check_choice(kwargs["teacher"], "method_kwargs.teacher", TEACHERS)
    NeCoLoss(**loss_kwargs(kwargs))  # NeCoLoss names the argument of any value it refuses
    return kwargs


def loss_kwargs(method_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``NeCoLoss`` keyword arguments among parsed ``method_kwargs``."""
    kwargs = {key: method_kwargs[key] for key in LOSS_DEFAULTS}
    kwargs["steepness"] = tuple(kwargs["steepness"])
    return kwargs


def _steepness_pair(value: Any) -> list[float]:
    """``[student, teacher]`` from one number or a pair."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value), float(value)]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return [float(item) for item in value]
    raise ValueError(
        f"method_kwargs.steepness must be a number or [student, teacher] but is {value!r}."
    )
