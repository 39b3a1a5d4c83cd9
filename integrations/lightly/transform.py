"""``NeCoTransform``: NeCo's multi-crop views with their boxes, in lightly's transform style.

Like lightly's ``VICRegLTransform`` returns views then grids in one flat list, this returns the
``V`` views followed by their ``V`` boxes, so that ``MultiViewCollate`` and lightly's datasets
handle it unchanged. Crops and flips come from lightly's ``RandomResizedCropWithLocation`` and
``RandomHorizontalFlipWithLocation``; the boxes are read from their ``Location`` (not from
lightly's ``location_to_NxN_grid``, whose grid is off by half a cell); the photometric stage is
lightly's ``VICRegLViewTransform`` with the NeCo reference settings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from lightly.transforms.random_crop_and_flip_with_grid import (
    Location,
    RandomHorizontalFlipWithLocation,
    RandomResizedCropWithLocation,
)
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.transforms.vicregl_transform import VICRegLViewTransform
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import to_pil_image

from neco_loss.data.multicrop import sample_overlapping


def location_box(location: Location) -> Tensor:
    """``(5,)`` box ``(x0, y0, x1, y1, flip)`` in original-image pixels of a ``Location``."""
    return torch.tensor(
        [
            location.left,
            location.top,
            location.left + location.width,
            location.top + location.height,
            float(location.horizontal_flip),
        ]
    )


def split_views_and_boxes(batch: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Split a collated ``NeCoTransform`` output into ``views`` and ``boxes (B, V, 5)``."""
    if len(batch) % 2:
        raise ValueError(f"expected V views followed by V boxes but got {len(batch)} entries.")
    views = len(batch) // 2
    return list(batch[:views]), torch.stack(list(batch[views:]), dim=1)


class NeCoTransform:
    """Global and local crops of an image, photometric augmentations, and the crops' boxes.

    Defaults are the NeCo reference configuration (2 x 224 px crops of scale (0.25, 1), 4 x 98 px
    crops of scale (0.05, 0.25), crops resampled until each overlaps every earlier global crop by
    more than 1% of the image, 2% between globals; colour jitter (0.8, 0.8, 0.8, 0.2) with
    p = 0.8, grayscale 0.2, blur p = 0.5; no flips).

    Args:
        global_crop_size: Side of the global crops.
        global_crop_scale: Area range of the global crops.
        local_crop_size: Side of the local crops.
        local_crop_scale: Area range of the local crops.
        n_global_views: Number of global crops.
        n_local_views: Number of local crops.
        min_overlap: Minimum overlap with earlier global crops, as a fraction of the image.
        hf_prob: Probability of a horizontal flip per view (recorded in the boxes).
        max_tries: Resampling attempts per crop.
        cj_prob: Probability of colour jitter (reference: 0.8).
        cj_strength: Multiplies the four jitter amounts (reference: 1.0).
        cj_bright: Brightness jitter (reference: 0.8).
        cj_contrast: Contrast jitter (reference: 0.8).
        cj_sat: Saturation jitter (reference: 0.8).
        cj_hue: Hue jitter (reference: 0.2).
        random_gray_scale: Probability of grayscale (reference: 0.2).
        gaussian_blur_prob: Probability of blur (reference: 0.5).
        gaussian_blur_sigmas: Blur sigma range (reference: (0.1, 2)).
        solarize_prob: Probability of solarization (reference: 0).
        normalize: Mean and std for normalisation; ``None`` leaves pixels in [0, 1].
            All photometric options go to lightly's ``VICRegLViewTransform``.

    Returns (per call):
        ``[view_0, ..., view_{V-1}, box_0, ..., box_{V-1}]``: views ``(3, size, size)``,
        boxes ``(5,)`` ``(x0, y0, x1, y1, flip)`` in original-image pixels.

    """

    def __init__(
        self,
        global_crop_size: int = 224,
        global_crop_scale: tuple[float, float] = (0.25, 1.0),
        local_crop_size: int = 98,
        local_crop_scale: tuple[float, float] = (0.05, 0.25),
        n_global_views: int = 2,
        n_local_views: int = 4,
        min_overlap: float = 0.01,
        hf_prob: float = 0.0,
        max_tries: int = 1000,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        gaussian_blur_prob: float = 0.5,
        gaussian_blur_sigmas: tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.0,
        normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE,
    ) -> None:
        if n_global_views < 1 or n_local_views < 0:
            raise ValueError(
                f"need n_global_views >= 1 and n_local_views >= 0 but got {n_global_views}, "
                f"{n_local_views}."
            )
        if not 0 <= min_overlap < 1:
            raise ValueError(f"min_overlap must be in [0, 1) but is {min_overlap!r}.")
        self.crops = [
            RandomResizedCropWithLocation(size=global_crop_size, scale=global_crop_scale)
        ] * n_global_views + [
            RandomResizedCropWithLocation(size=local_crop_size, scale=local_crop_scale)
        ] * n_local_views
        self.flip = RandomHorizontalFlipWithLocation(p=hf_prob)
        self.n_global_views = n_global_views
        self.min_overlap = min_overlap
        self.max_tries = max_tries
        self.view_transform = VICRegLViewTransform(
            gaussian_blur_prob=gaussian_blur_prob,
            gaussian_blur_sigmas=gaussian_blur_sigmas,
            solarize_prob=solarize_prob,
            cj_prob=cj_prob,
            cj_strength=cj_strength,
            cj_bright=cj_bright,
            cj_contrast=cj_contrast,
            cj_sat=cj_sat,
            cj_hue=cj_hue,
            random_gray_scale=random_gray_scale,
            normalize=normalize,
        )

    def _crop(
        self, image: Image.Image, index: int, boxes: list[Tensor]
    ) -> tuple[Image.Image, Tensor]:
        """Crop ``index``, resampled until it overlaps the earlier global crops enough."""
        area = image.width * image.height
        required = self.min_overlap * area * (2 if index < self.n_global_views else 1)
        earlier = boxes[: min(index, self.n_global_views)]
        earlier_global = torch.stack(earlier) if earlier else torch.empty(0, 5)

        def propose() -> tuple[Tensor, tuple[Image.Image, Location]]:
            with warnings.catch_warnings():
                # lightly's RandomResizedCropWithLocation calls torchvision's deprecated
                # get_image_size; the warning is lightly's to fix, not the user's to read
                warnings.filterwarnings("ignore", message="The function `get_image_size")
                view, location = self.crops[index](image)
            return location_box(location), (view, location)

        _, (view, location) = sample_overlapping(
            propose, earlier_global, required, self.max_tries, index
        )
        view, location = self.flip(view, location)
        return view, location_box(location)

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor]:
        """Views followed by boxes; see the class docstring."""
        pil_image = to_pil_image(image) if isinstance(image, Tensor) else image
        image = pil_image.convert("RGB")
        views: list[Tensor] = []
        boxes: list[Tensor] = []
        for index in range(len(self.crops)):
            view, box = self._crop(image, index, boxes)
            views.append(self.view_transform(view))
            boxes.append(box)
        return views + boxes
