"""Dense evaluation protocols and the mIoU metric."""

from neco_loss.evaluation.in_context import InContextResult, in_context_miou
from neco_loss.evaluation.miou import ConfusionMatrix

__all__ = ["ConfusionMatrix", "InContextResult", "in_context_miou"]
