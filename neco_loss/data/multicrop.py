"""``NeCoMultiCrop``: global and local crops of an image, with their boxes.

Reference: ``src/neco_transforms.py`` of the NeCo code. Each crop is a random resized crop;
every crop after the first is resampled until it overlaps each earlier global crop by more than
``min_overlap`` of the image area (twice that between global crops). Then the reference
photometric augmentations: colour jitter (0.8, 0.8, 0.8, 0.2) with p = 0.8, grayscale p = 0.2,
Gaussian blur sigma (0.1, 2) with p = 0.5, ImageNet normalisation. Flips are off by default
(reference) and recorded in the boxes' 5th column when on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from neco_loss.geometry import intersection_area

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default, as the reference
BLUR_KERNEL = 9  # the reference's GaussianBlur(kernel_size=9)


def photometric_augmentation(
    jitter_strength: float = 1.0, blur_strength: float = 1.0
) -> v2.Compose:
    """The reference colour transform (``NeCoTransforms.color_transform``) on float images."""
    jitter = v2.ColorJitter(
        0.8 * jitter_strength, 0.8 * jitter_strength, 0.8 * jitter_strength, 0.2 * jitter_strength
    )
    sigma = (0.1 * blur_strength, 2.0 * blur_strength)
    return v2.Compose(
        [
            v2.RandomApply([jitter], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=sigma)], p=0.5),
        ]
    )


def to_float_image(image: Tensor | Image.Image) -> Tensor:
    """``(3, H, W)`` float32 in [0, 1] from a PIL image or a uint8/float tensor."""
    if isinstance(image, Image.Image):
        image = v2.functional.pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a PIL image or a (3, H, W) tensor but is {shape}.")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if not image.is_floating_point():
        return image.float() / 255
    return image.float()


Proposal = TypeVar("Proposal")


def sample_overlapping(
    propose: Callable[[], tuple[Tensor, Proposal]],
    earlier_global: Tensor,
    required_area: float,
    max_tries: int,
    index: int,
) -> tuple[Tensor, Proposal]:
    """Draw crops from ``propose`` until one overlaps every earlier global crop enough.

    Args:
        propose: Returns a crop's box ``(4+,)`` in image pixels and anything else to keep.
        earlier_global: ``(k, 4+)`` boxes of the global crops drawn so far (``k`` may be 0).
        required_area: The overlap each of them needs, in square pixels (strictly more).
        max_tries: Attempts before giving up.
        index: The crop's index, for the error message.

    Raises:
        ValueError: If no attempt overlaps enough.

    """
    for _ in range(max_tries):
        box, payload = propose()
        if bool((intersection_area(box, earlier_global) > required_area).all()):
            return box, payload
    raise ValueError(
        f"could not sample crop {index} overlapping the earlier global crops by more than "
        f"{required_area:.0f} square pixels in {max_tries} tries; lower min_overlap or raise "
        "the crop scales."
    )


def sample_crop_boxes(
    height: int,
    width: int,
    scales: Sequence[tuple[float, ...]],
    flip_probabilities: Sequence[float],
    num_global: int,
    min_overlap: float,
    max_tries: int,
) -> Tensor:
    """Random resized crop boxes, resampled until they overlap the earlier global crops.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        scales: Per crop, the ``(low, high)`` area fraction of ``RandomResizedCrop``.
        flip_probabilities: Per crop, the probability of a horizontal flip.
        num_global: The first ``num_global`` crops are global.
        min_overlap: Each crop overlaps every earlier global crop by more than this fraction of
            the image area, twice that between global crops (reference: 0.01).
        max_tries: Attempts per crop before a ``ValueError``.

    Returns:
        ``(V, 5)`` float32 ``(x0, y0, x1, y1, flip)`` in image pixels (global RNG).

    """
    boxes = torch.zeros(len(scales), 5)
    area = height * width
    placeholder = torch.empty(1, height, width)
    for index, (scale, flip_probability) in enumerate(zip(scales, flip_probabilities, strict=True)):
        required = min_overlap * area * (2 if index < num_global else 1)
        earlier_global = boxes[: min(index, num_global), :4]

        def propose(scale: tuple[float, ...] = scale) -> tuple[Tensor, None]:
            top, left, h, w = v2.RandomResizedCrop.get_params(placeholder, list(scale), CROP_RATIO)
            return torch.tensor([left, top, left + w, top + h], dtype=torch.float32), None

        box, _ = sample_overlapping(propose, earlier_global, required, max_tries, index)
        flipped = flip_probability > 0 and bool(torch.rand(()) < flip_probability)
        boxes[index] = torch.cat([box, torch.tensor([float(flipped)])])
    return boxes


class NeCoMultiCrop:
    """Random global and local crops with their boxes in original-image pixels.

    Args:
        global_size: Side of the global crops (reference: 224 or 518).
        local_size: Side of the local crops (reference: 98).
        num_global: Number of global crops (reference: 2).
        num_local: Number of local crops (reference: 4).
        global_scale: Area fraction range of global crops (reference: (0.25, 1)).
        local_scale: Area fraction range of local crops (reference: (0.05, 0.25)).
        min_overlap: Each crop must overlap every earlier global crop by more than this fraction
            of the image area, twice that between global crops (reference: 0.01).
        flip: Flip each crop horizontally with p = 0.5 (reference: off).
        photometric: Apply the reference colour augmentations.
        normalize: Normalise with ImageNet statistics.
        max_tries: Resampling attempts per crop before giving up with a ``ValueError``.
        jitter_strength: Scales the colour jitter (reference configs: 1.0).
        blur_strength: Scales the blur's sigma range (reference configs: 1.0).

    Returns (per call):
        ``views``: list of ``num_global + num_local`` tensors ``(3, size, size)``, global first;
        ``boxes``: ``(V, 5)`` float32 ``(x0, y0, x1, y1, flip)`` in original-image pixels.

    Examples:
        >>> transform = NeCoMultiCrop(global_size=64, local_size=32)
        >>> views, boxes = transform(torch.rand(3, 120, 160))
        >>> [tuple(view.shape) for view in views][1:3], tuple(boxes.shape)
        ([(3, 64, 64), (3, 32, 32)], (6, 5))

    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 98,
        num_global: int = 2,
        num_local: int = 4,
        global_scale: Sequence[float] = (0.25, 1.0),
        local_scale: Sequence[float] = (0.05, 0.25),
        min_overlap: float = 0.01,
        flip: bool = False,
        photometric: bool = True,
        normalize: bool = True,
        max_tries: int = 1000,
        jitter_strength: float = 1.0,
        blur_strength: float = 1.0,
    ) -> None:
        # The blur's 9-pixel kernel pads by 4 with reflection, which needs crops of 5 pixels.
        smallest = BLUR_KERNEL // 2 + 1 if photometric else 1
        for name, value in (("global_size", global_size), ("local_size", local_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"{name} must be an int >= {smallest} but is {value!r}.")
        if num_global < 1 or num_local < 0:
            raise ValueError(
                f"need num_global >= 1 and num_local >= 0 but got {num_global}, {num_local}."
            )
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1: {scale}.")
        if not 0 <= min_overlap < 1:
            raise ValueError(f"min_overlap must be in [0, 1) but is {min_overlap!r}.")
        self.sizes = [global_size] * num_global + [local_size] * num_local
        self.scales = [tuple(global_scale)] * num_global + [tuple(local_scale)] * num_local
        self.num_global = num_global
        self.min_overlap = min_overlap
        self.flip = flip
        self.max_tries = max_tries
        self.photometric = (
            photometric_augmentation(jitter_strength, blur_strength) if photometric else None
        )
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD) if normalize else None

    def sample_boxes(self, height: int, width: int) -> Tensor:
        """``(V, 5)`` crop boxes for an image of ``height x width`` (global RNG)."""
        flip_probabilities = [0.5 if self.flip else 0.0] * len(self.scales)
        return sample_crop_boxes(
            height,
            width,
            self.scales,
            flip_probabilities,
            self.num_global,
            self.min_overlap,
            self.max_tries,
        )

    def __call__(self, image: Tensor | Image.Image) -> tuple[list[Tensor], Tensor]:
        """Crop, augment and return ``(views, boxes)``; see the class docstring."""
        image = to_float_image(image)
        boxes = self.sample_boxes(image.shape[1], image.shape[2])
        views = []
        for (x0, y0, x1, y1, flipped), size in zip(boxes.tolist(), self.sizes, strict=True):
            view = v2.functional.resized_crop(
                image, int(y0), int(x0), int(y1 - y0), int(x1 - x0), [size, size], antialias=True
            )
            if flipped:
                view = view.flip(-1)
            if self.photometric is not None:
                view = self.photometric(view)
            if self.normalize is not None:
                view = self.normalize(view)
            views.append(view)
        return views, boxes
