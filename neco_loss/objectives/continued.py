"""``continued``: the starting backbone's own objective at NeCo's budget (a control arm).

What a user would otherwise run is more of the pretraining that made the backbone. For the
testbed backbone that is VICReg(L) (``neco_loss.testbed``: lightly's ``VICRegLoss`` on the
pooled embeddings of pairs of views plus its location-matched term on the ROI-aligned patch
tokens), with fresh expanders as NeCo starts with a fresh projection head. It reads the
student's *backbone* maps of every view, as the testbed's pretraining did; the teacher's maps
are computed (the same forwards as every arm) but not used.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from neco_loss.dense_objective import DenseObjective
from neco_loss.testbed import ROI_SIZE, expander, vicregl_loss


class ContinuedVICRegL(DenseObjective):
    """The testbed's VICReg(L) pretraining loss, with its own two expanders.

    Args:
        embed_dim: The backbone's feature size.
        patch_size: The backbone's patch side in pixels.
        local_weight: Weight of the patch-token term (the testbed's: 1.0).
        roi_size: Side of the aligned token grid of a pair (the testbed's: 4).

    """

    def __init__(
        self, embed_dim: int, patch_size: int, local_weight: float = 1.0, roi_size: int = ROI_SIZE
    ) -> None:
        super().__init__()
        from lightly.loss import VICRegLoss  # the train extra

        if isinstance(local_weight, bool) or not isinstance(local_weight, int | float):
            raise ValueError(f"local_weight must be a number but is {local_weight!r}.")
        self.expanders = nn.ModuleList([expander(embed_dim), expander(embed_dim)])
        self.criterion = VICRegLoss()
        self.patch_size = patch_size
        self.local_weight = float(local_weight)
        if isinstance(roi_size, bool) or not isinstance(roi_size, int) or roi_size < 1:
            raise ValueError(f"roi_size must be an int >= 1 but is {roi_size!r}.")
        self.roi_size = roi_size

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
        """VICReg(L) of the student's views; arguments as ``NeCoLoss.forward``.

        ``teacher_maps`` only says how many views are global; ``crop_sizes`` is required.

        Raises:
            ValueError: Without ``crop_sizes`` for every view.

        """
        if crop_sizes is None or len(crop_sizes) != len(student_maps):
            raise ValueError(
                f"crop_sizes must give each of the {len(student_maps)} views' crop size in "
                f"pixels but is {crop_sizes!r}."
            )
        sizes = [_height_width(size) for size in crop_sizes]
        return vicregl_loss(
            self.criterion,
            list(student_maps),
            boxes,
            sizes,
            self.patch_size,
            (self.expanders[0], self.expanders[1]),
            len(teacher_maps),
            self.local_weight,
            self.roi_size,
        )

    def check_batch(self, batch: int) -> None:
        """VICReg's variance and covariance terms need two images at least.

        Raises:
            ValueError: For a batch of one image.

        """
        if batch < 2:
            raise ValueError(
                f"objective 'continued' (VICReg) needs batch_size >= 2 but is {batch}."
            )


def _height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """``side`` or ``(height, width)`` as ``(height, width)``."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)
