"""PaKa (Patch Kernel Alignment, arXiv 2509.05606) on NeCo's ROI-aligned token pairs.

lightly's ``PatchKernelAlignmentLoss`` (1 - CKA between the student's and the teacher's linear
kernels over an image's tokens) in the cross-view form its docstring gives: the caller aligns
the two crops' shared region onto a common grid. Here that grid is NeCo's own
(``aligned_tokens``): the same pairs, the same ``roi_size x roi_size`` tokens, so that only
the loss differs from NeCo.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from neco_loss.dense_objective import DenseObjective
from neco_loss.geometry import REFERENCE_ROI_SIZE
from neco_loss.loss_inputs import check_loss_inputs
from neco_loss.objectives.aligned_tokens import aligned_token_pairs


class PatchKernelAlignment(DenseObjective):
    """lightly's PaKa loss over every overlapping (image, pair) of crops.

    The loss is lightly's mean over images of ``1 - CKA``, taken over all (image, pair)
    combinations at once, so each weighs as one NeCo query patch group does.

    Args:
        roi_size: Side of the aligned grid (NeCo reference: 7).
        max_tokens: lightly's ``max_tokens`` (subsample tokens above it; ``None``: all).
        patch_size: The backbone's patch side, to map boxes with ``crop_sizes`` (as
            ``NeCoLoss``).

    """

    def __init__(
        self,
        roi_size: int = REFERENCE_ROI_SIZE,
        max_tokens: int | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(roi_size, bool) or not isinstance(roi_size, int) or roi_size < 2:
            raise ValueError(
                f"roi_size must be an int >= 2 (a kernel over one token is constant) but is "
                f"{roi_size!r}."
            )
        self.roi_size = roi_size
        self.patch_size = patch_size
        from lightly.loss import PatchKernelAlignmentLoss  # the train extra: lightly >= 1.6

        self.criterion = PatchKernelAlignmentLoss(max_tokens=max_tokens)

    def forward(
        self,
        student_maps: Sequence[Tensor],
        teacher_maps: Sequence[Tensor],
        boxes: Tensor,
        *,
        crop_sizes: Sequence[int | Sequence[int]] | None = None,
        foreground: Sequence[Tensor] | None = None,
        compute_stats: bool | None = None,
    ) -> Tensor:
        """The loss; arguments as ``NeCoLoss.forward`` (``foreground`` must be ``None``)."""
        inputs = check_loss_inputs(
            student_maps, teacher_maps, boxes, crop_sizes, foreground, "all", self.patch_size
        )
        teacher, student = aligned_token_pairs(inputs, self.roi_size)
        return self.criterion(student.float(), teacher.detach().float())
