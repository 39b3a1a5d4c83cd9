"""Mean intersection over union from a streaming confusion matrix, and per scored image.

``image_counts`` keeps every image's pixel counts per class, so that the mIoU of any resample
of the scored images (a bootstrap over images, ``neco_loss.app.statistics``) is
``miou_of_counts`` of their sum, and the sum over all images gives ``ConfusionMatrix.miou``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ConfusionMatrix:
    """Accumulates ``confusion[target, prediction]`` over batches.

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Target value left out of the counts (e.g. 255 for Pascal VOC).
        num_predictions: Number of predicted ids ``K`` when they are clusters to be matched to
            classes (``matched``); default ``C``.

    Examples:
        >>> matrix = ConfusionMatrix(2)
        >>> matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        >>> round(matrix.miou(), 4)  # IoU 1/2 for both classes
        0.5

    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = None, num_predictions: int | None = None
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1 but is {num_classes!r}.")
        self.num_classes = num_classes
        self.num_predictions = num_predictions or num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, self.num_predictions, dtype=torch.long)
        self.unmatched = torch.zeros(num_classes, dtype=torch.long)  # per target class

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Count a batch of predictions and targets of the same shape (class indices).

        Raises:
            ValueError: If the shapes differ or a value lies outside ``[0, C)`` (targets equal
                to ``ignore_index`` excepted).

        """
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ."
            )
        prediction, target = prediction.flatten().long().cpu(), target.flatten().long().cpu()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            prediction, target = prediction[keep], target[keep]
        limits = (
            ("prediction", prediction, self.num_predictions),
            ("target", target, self.num_classes),
        )
        for name, values, limit in limits:
            if len(values) and (values.min() < 0 or values.max() >= limit):
                raise ValueError(
                    f"{name} values must be in [0, {limit}) but span "
                    f"[{int(values.min())}, {int(values.max())}]."
                )
        self.matrix += torch.bincount(
            target * self.num_predictions + prediction,
            minlength=self.num_classes * self.num_predictions,
        ).view(self.num_classes, self.num_predictions)

    def assignment(self, matching: str) -> Tensor:
        """``(K,)`` class of every predicted id (-1: unmatched); see ``matched``."""
        counts = self.matrix  # (C, K): targets x predicted ids
        if matching == "many_to_one":
            return counts.argmax(dim=0)
        if matching == "hungarian":
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
            assignment = torch.full((counts.shape[1],), -1, dtype=torch.long)
            assignment[torch.as_tensor(cols)] = torch.as_tensor(rows)
            return assignment
        raise ValueError(f"matching must be 'hungarian' or 'many_to_one' but is {matching!r}.")

    def matched(self, matching: str) -> ConfusionMatrix:
        """A confusion matrix with predicted clusters relabelled to classes.

        Args:
            matching: ``"hungarian"``: the one-to-one assignment of predictions to classes that
                maximises the matched pixels (``scipy.optimize.linear_sum_assignment``; needs as
                many predicted ids as classes or more, unmatched ids count as wrong);
                ``"many_to_one"``: every predicted id goes to the class it overlaps most.

        Returns:
            A new ``ConfusionMatrix`` over the ``C`` classes.

        """
        counts = self.matrix
        classes = counts.shape[0]
        assignment = self.assignment(matching)
        result = ConfusionMatrix(classes, self.ignore_index)
        for cluster, label in enumerate(assignment.tolist()):
            if label >= 0:
                result.matrix[:, label] += counts[:, cluster]
            else:  # an unmatched cluster: its pixels are wrong for every class
                result.unmatched += counts[:, cluster]
        return result

    def iou(self) -> Tensor:
        """``(C,)`` IoU per class; NaN for classes absent from both targets and predictions."""
        if self.num_predictions != self.num_classes:
            raise ValueError("predictions are cluster ids: call matched(...) first.")
        matrix = self.matrix.double()
        true_positive = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) + self.unmatched.double() - true_positive
        return torch.where(union > 0, true_positive / union.clamp(min=1), float("nan"))

    def miou(self) -> float:
        """Mean IoU over the classes that occur in targets or predictions."""
        return float(self.iou().nanmean())


def image_counts(
    prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """Every image's ``(3, C)`` pixel counts: right, predicted and labelled, per class.

    Args:
        prediction: ``(B, H, W)`` predicted class indices in ``[0, C)``.
        target: ``(B, H, W)`` labels (``ignore_index`` pixels left out).
        num_classes: ``C``.
        ignore_index: Label left out.

    Returns:
        ``(B, 3, C)`` int64: true positives, predicted pixels and labelled pixels per class.

    """
    batch = prediction.shape[0]
    prediction, target = prediction.reshape(batch, -1).long(), target.reshape(batch, -1).long()
    keep = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        keep = target != ignore_index
    image = torch.arange(batch, device=target.device)[:, None].expand_as(target)[keep]
    predicted, labelled = prediction[keep], target[keep]
    size = batch * num_classes

    def per_class(classes: Tensor, where: Tensor) -> Tensor:
        indices = (image * num_classes + classes)[where]
        return torch.bincount(indices, minlength=size).view(batch, num_classes)

    everywhere = torch.ones_like(predicted, dtype=torch.bool)
    return torch.stack(
        [
            per_class(labelled, predicted == labelled),
            per_class(predicted, everywhere),
            per_class(labelled, everywhere),
        ],
        dim=1,
    ).cpu()


def miou_of_counts(counts: Tensor) -> Tensor:
    """The mIoU of summed ``image_counts``: ``(..., 3, C)`` -> ``(...)``.

    IoU of a class is ``right / (predicted + labelled - right)``; the mean is over the classes
    that occur in the labels or the predictions, as ``ConfusionMatrix.miou``.
    """
    counts = counts.double()
    right, predicted, labelled = counts.unbind(dim=-2)
    union = predicted + labelled - right
    iou = torch.where(union > 0, right / union.clamp(min=1), float("nan"))
    return iou.nanmean(dim=-1)
