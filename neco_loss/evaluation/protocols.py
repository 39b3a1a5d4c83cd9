"""The evaluation protocols by name: each scores one backbone and returns one outcome.

``PROTOCOLS`` maps a protocol's name (``neco eval``'s argument) to a function
``(features, Scoring) -> ProtocolOutcome``, as ``sorting.BACKENDS`` maps backend names to
sorters; ``evaluation.suite.evaluate`` runs the chosen ones on every backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from neco_loss.evaluation.fractions import in_context_fractions
from neco_loss.evaluation.in_context import SegmentationDataset, in_context_miou
from neco_loss.evaluation.linear import linear_segmentation_miou
from neco_loss.evaluation.overclustering import overclustering_miou

FeatureFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ProtocolInputs:
    """What every protocol is given besides the backbone.

    Attributes:
        train_set: ``(image, mask)`` pairs: memory bank / linear training.
        val_set: ``(image, mask)`` pairs to score (overclustering uses only these).
        num_classes: Number of classes.
        ignore_index: Label left out of the scores.
        shown: Number of scored images whose predictions are kept for the figures.
        clusters: Overclustering ``K`` values, ``num_classes`` first.
        linear_epochs: Epochs of the linear head.
        search: In-context neighbour search, ``"torch"`` or ``"scann"``.
        progress: Show progress bars.
        seed: Seed of the linear probe (initialisation and batch order).

    """

    train_set: SegmentationDataset
    val_set: SegmentationDataset
    num_classes: int
    ignore_index: int | None
    shown: int
    clusters: tuple[int, ...]
    linear_epochs: int
    search: str
    progress: bool
    seed: int = 0


@dataclass
class ProtocolOutcome:
    """One backbone's outcome of one protocol.

    Attributes:
        scores: ``{metric: value}`` (columns of the results table).
        predictions: Class maps of the first ``shown`` scored images, for the figure
            (``None``: the protocol draws none).
        figure_label: Suffix of the backbone's name in the figure (e.g. ``" K=500"``).
        figure_score: The score printed beside the figure's row.
        per_class: IoU per class, when the protocol has one.
        per_image: ``(N, 3, C)`` every scored image's pixel counts (``miou.image_counts``)
            when the protocol segments the scored images, for a bootstrap over images.

    """

    scores: dict[str, float]
    predictions: Tensor | None = None
    figure_label: str = ""
    figure_score: float | None = None
    per_class: list[float] = field(default_factory=list)
    per_image: Tensor | None = None


def _in_context(features: FeatureFn, inputs: ProtocolInputs) -> ProtocolOutcome:
    result = in_context_miou(
        features,
        inputs.train_set,
        inputs.val_set,
        inputs.num_classes,
        ignore_index=inputs.ignore_index,
        keep_predictions=inputs.shown,
        search=inputs.search,
        progress=inputs.progress,
    )
    scores = {"in-context mIoU": result.miou}
    return ProtocolOutcome(
        scores, result.predictions, "", result.miou, result.iou.tolist(), result.per_image
    )


def _linear(features: FeatureFn, inputs: ProtocolInputs) -> ProtocolOutcome:
    result = linear_segmentation_miou(
        features,
        inputs.train_set,
        inputs.val_set,
        inputs.num_classes,
        epochs=inputs.linear_epochs,
        ignore_index=inputs.ignore_index,
        seed=inputs.seed,
        keep_predictions=inputs.shown,
        progress=inputs.progress,
    )
    scores = {"linear mIoU": result.miou}
    return ProtocolOutcome(
        scores, result.predictions, "", result.miou, result.iou.tolist(), result.per_image
    )


def _overclustering(features: FeatureFn, inputs: ProtocolInputs) -> ProtocolOutcome:
    result = overclustering_miou(
        features,
        inputs.val_set,
        inputs.num_classes,
        inputs.clusters,
        ignore_index=inputs.ignore_index,
        progress=inputs.progress,
    )
    largest = inputs.clusters[-1]  # the figure shows the clusters at the largest K
    return ProtocolOutcome(
        {f"overclustering K={k}": value for k, value in result.miou.items()},
        result.matched_maps[largest][: inputs.shown],  # clusters coloured by matched class
        f" K={largest}",
        result.miou[largest],
    )


def _fractions(features: FeatureFn, inputs: ProtocolInputs) -> ProtocolOutcome:
    scores = in_context_fractions(
        features,
        inputs.train_set,
        inputs.val_set,
        inputs.num_classes,
        ignore_index=inputs.ignore_index,
    )
    return ProtocolOutcome(
        {f"in-context 1/{round(1 / fraction)}": value for fraction, value in scores.items()}
    )


PROTOCOLS: dict[str, Callable[[FeatureFn, ProtocolInputs], ProtocolOutcome]] = {
    "in-context": _in_context,
    "linear": _linear,
    "overclustering": _overclustering,
    "fractions": _fractions,
}
