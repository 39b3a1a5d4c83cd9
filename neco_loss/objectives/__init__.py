"""Dense objectives by name: NeCo and the alternatives a user would otherwise run, as arms.

Every objective is computed on the same step: the same crops, the same student and EMA
teacher maps, the same ROI-aligned pairs of crops (``aligned_tokens``), optimiser and
schedules; only the loss differs. ``OBJECTIVES`` maps the ``objective:`` key of a training
config to how the loss is built:

- ``neco``: ``NeCoLoss`` (the default);
- ``paka``: lightly's ``PatchKernelAlignmentLoss`` on the aligned tokens (``paka``);
- ``similarity_ce``: a softmax cross-entropy over the similarities to NeCo's references,
  NeCo without the sorting (``similarity_ce``);
- ``continued``: the testbed backbone's own VICReg(L) pretraining loss (``continued``), on
  the backbone's maps (no projection head), with its own expanders trained at ``lr_head``.

Each loss module is called as ``NeCoLoss`` is (student maps, teacher maps, boxes; keywords
``crop_sizes``, ``foreground``, ``compute_stats``) and has ``loss_mask``, ``generator``,
``last_stats`` and ``check_batch``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from neco_loss.checks import did_you_mean
from neco_loss.dense_objective import DenseObjective
from neco_loss.functional import SortOptions
from neco_loss.loss import NeCoLoss
from neco_loss.objectives.continued import ContinuedVICRegL
from neco_loss.objectives.paka import PatchKernelAlignment
from neco_loss.objectives.similarity_ce import SimilarityCELoss
from neco_loss.testbed import TESTBED_MODEL, TESTBED_MODEL_KWARGS

# What the trainer passes itself; not keys of ``loss:``.
BUILDER_ARGUMENTS = ("seed", "gather", "compute_stats", "patch_size", "embed_dim")


@dataclass(frozen=True)
class BuildContext:
    """What the trainer knows about the step that an objective may need.

    Attributes:
        patch_size: The backbone's patch side in pixels.
        embed_dim: The backbone's feature size.
        seed: Seed of the objective's random draws.
        gather: Cross-process gather of the references (``NeCoLoss``'s ``gather``), ``None``
            on one process; the objectives without references leave the mean over processes
            to DistributedDataParallel.

    """

    patch_size: int | None = None
    embed_dim: int = 8
    seed: int | None = None
    gather: Callable[[Tensor], Sequence[Tensor]] | None = None


def _neco(options: dict[str, Any], context: BuildContext) -> DenseObjective:
    return NeCoLoss(
        patch_size=context.patch_size, seed=context.seed, gather=context.gather, **options
    )


def _similarity_ce(options: dict[str, Any], context: BuildContext) -> DenseObjective:
    return SimilarityCELoss(
        patch_size=context.patch_size, seed=context.seed, gather=context.gather, **options
    )


def _paka(options: dict[str, Any], context: BuildContext) -> DenseObjective:
    return PatchKernelAlignment(patch_size=context.patch_size, **options)


def _continued(options: dict[str, Any], context: BuildContext) -> DenseObjective:
    return ContinuedVICRegL(context.embed_dim, context.patch_size or 1, **options)


@dataclass(frozen=True)
class Objective:
    """One objective of ``OBJECTIVES``.

    Attributes:
        build: ``(loss: options, context) -> loss module``.
        keys: The ``loss:`` keys it takes.
        projects: It compares the projection head's maps (else the backbone's: no head).

    """

    build: Callable[[dict[str, Any], BuildContext], DenseObjective]
    keys: tuple[str, ...]
    projects: bool = True


def _keys(function: Callable[..., Any]) -> tuple[str, ...]:
    """The keyword arguments of ``function`` that a config's ``loss:`` may set."""
    names = inspect.signature(function).parameters
    return tuple(n for n in names if n not in BUILDER_ARGUMENTS and n != "reference_options")


_SORT_KEYS = {option.name for option in fields(SortOptions)}
OBJECTIVES: dict[str, Objective] = {
    "neco": Objective(_neco, _keys(NeCoLoss)),
    "similarity_ce": Objective(
        _similarity_ce,
        _keys(SimilarityCELoss) + tuple(k for k in _keys(NeCoLoss) if k not in _SORT_KEYS),
    ),
    "paka": Objective(_paka, _keys(PatchKernelAlignment)),
    "continued": Objective(_continued, _keys(ContinuedVICRegL), projects=False),
}


def objective_named(name: str) -> Objective:
    """The objective ``name`` of ``OBJECTIVES``.

    Raises:
        ValueError: Naming the objectives there are.

    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)} but is {name!r}.")
    return OBJECTIVES[name]


def build_objective(
    name: str, options: dict[str, Any], context: BuildContext | None = None
) -> DenseObjective:
    """The loss module of objective ``name`` with ``options`` (a config's ``loss:``).

    Raises:
        ValueError: For an unknown objective, a key it does not take (naming the keys it
            takes), or an option its loss refuses.

    """
    objective = objective_named(name)
    unknown = [key for key in options if key not in objective.keys]
    if unknown:
        raise ValueError(
            f"loss keys {unknown} do not apply to objective {name!r}; it takes "
            f"{list(objective.keys)}."
        )
    return objective.build(options, context or BuildContext())


def check_objective(
    name: str, options: dict[str, Any], model: str, model_kwargs: dict[str, Any]
) -> None:
    """Refuse a config's objective, ``loss:`` options or model before anything is built.

    Raises:
        ValueError: For an unknown objective or loss key (with the nearest key), an option the
            loss refuses (prefixed ``loss:``), or ``continued`` on a model other than the
            testbed's (whose pretraining objective is the only one known here).

    """
    valid = list(objective_named(name).keys)
    of = "" if name == "neco" else f" of objective {name!r}"
    for key in options:
        if key not in valid:
            raise ValueError(
                f"unknown loss key {key!r}{did_you_mean(key, valid)}; valid loss keys{of}: {valid}."
            )
    try:
        build_objective(name, options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"loss: {error}") from None
    if name == "continued" and (model, model_kwargs) != (TESTBED_MODEL, TESTBED_MODEL_KWARGS):
        raise ValueError(
            "objective 'continued' continues the starting backbone's own pretraining "
            "objective, which is known here only for the testbed backbone (VICReg(L); model "
            f"{TESTBED_MODEL} with the testbed's model_kwargs, weights: testbed), not for "
            f"model {model} {model_kwargs}: use objective neco, paka or similarity_ce."
        )
