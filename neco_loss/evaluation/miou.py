"""Mean intersection over union from a streaming confusion matrix."""

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
