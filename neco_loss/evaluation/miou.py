"""Mean intersection over union from a streaming confusion matrix."""

from __future__ import annotations

import torch
from torch import Tensor


class ConfusionMatrix:
    """Accumulates ``confusion[target, prediction]`` over batches.

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Target value left out of the counts (e.g. 255 for Pascal VOC).

    Examples:
        >>> matrix = ConfusionMatrix(2)
        >>> matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        >>> round(matrix.miou(), 4)  # IoU 1/2 for both classes
        0.5

    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1 but is {num_classes!r}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

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
        for name, values in (("prediction", prediction), ("target", target)):
            if len(values) and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(
                    f"{name} values must be in [0, {self.num_classes}) but span "
                    f"[{int(values.min())}, {int(values.max())}]."
                )
        self.matrix += torch.bincount(
            target * self.num_classes + prediction, minlength=self.num_classes**2
        ).view(self.num_classes, self.num_classes)

    def iou(self) -> Tensor:
        """``(C,)`` IoU per class; NaN for classes absent from both targets and predictions."""
        matrix = self.matrix.double()
        true_positive = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        return torch.where(union > 0, true_positive / union.clamp(min=1), float("nan"))

    def miou(self) -> float:
        """Mean IoU over the classes that occur in targets or predictions."""
        return float(self.iou().nanmean())
