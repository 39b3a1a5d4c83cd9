"""``BoxedMultiCrop``: solo-learn's augmentation pipelines, with the crops' boxes.

solo-learn's ``build_transform_pipeline`` crops and flips inside torchvision transforms and
forgets where. Here the crop and the flip are done first, with boxes recorded and the NeCo
overlap constraint applied; the rest of each pipeline (colour, blur, solarisation, tensor,
normalisation) is solo-learn's own, built from the same augmentation YAML.

Needs no solo-learn itself: the pipeline builder is passed in (``pretrain.solo_photometric``
builds solo-learn's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from neco_loss.data.multicrop import sample_crop_boxes

PipelineBuilder = Callable[[Mapping[str, Any]], Callable[[Image.Image], Tensor]]


class BoxedMultiCrop:
    """Multi-crop views in solo-learn's order, and their boxes in original-image pixels.

    One crop per ``num_crops`` of each augmentation entry, in the config's order. As solo-learn
    counts them, the crops of ``crop_size == augmentations[0].crop_size`` are the large (global)
    ones; they must come first. Each crop is a random resized crop of ``rrc.crop_min_scale`` to
    ``rrc.crop_max_scale`` (bicubic, as solo-learn), resampled until it overlaps every earlier
    global crop by more than ``min_overlap`` of the image (twice that between global crops),
    then flipped with ``horizontal_flip.prob``.

    Args:
        augmentations: solo-learn's ``cfg.augmentations`` list.
        build_pipeline: Builds the rest of an entry's pipeline (no crop, no flip) from the
            entry; called once per entry.
        min_overlap: Reference: 0.01.
        max_tries: Resampling attempts per crop before a ``ValueError``.

    Returns (per call on a PIL image):
        ``(views, boxes)``: ``V`` tensors ``(3, crop_size, crop_size)`` and ``(V, 5)``
        ``(x0, y0, x1, y1, flip)``. solo-learn's datasets then yield
        ``(index, (views, boxes), target)``.

    Raises:
        ValueError: If an entry lacks a key, disables the random resized crop, or a large crop
            follows a small one.

    """

    def __init__(
        self,
        augmentations: Sequence[Mapping[str, Any]],
        build_pipeline: PipelineBuilder,
        min_overlap: float = 0.01,
        max_tries: int = 1000,
    ) -> None:
        if not augmentations:
            raise ValueError("augmentations is empty: NeCo needs at least two crops.")
        self.sizes: list[int] = []
        self.scales: list[tuple[float, float]] = []
        self.flip_probabilities: list[float] = []
        self.pipelines: list[Callable[[Image.Image], Tensor]] = []
        large_size = _entry_value(augmentations[0], "crop_size", 0)
        for index, entry in enumerate(augmentations):
            if not _entry_value(entry, "rrc.enabled", index):
                raise ValueError(
                    f"augmentations[{index}].rrc.enabled is false; NeCo needs random crops."
                )
            size = int(_entry_value(entry, "crop_size", index))
            if size == large_size and self.sizes and self.sizes[-1] != large_size:
                raise ValueError(
                    f"augmentations[{index}] makes large crops ({size} px) after small ones; "
                    "list the large-crop entries first (solo-learn passes them first)."
                )
            scale = (
                float(_entry_value(entry, "rrc.crop_min_scale", index)),
                float(_entry_value(entry, "rrc.crop_max_scale", index)),
            )
            flip = float(_entry_value(entry, "horizontal_flip.prob", index))
            pipeline = build_pipeline(entry)
            for _ in range(int(_entry_value(entry, "num_crops", index))):
                self.sizes.append(size)
                self.scales.append(scale)
                self.flip_probabilities.append(flip)
                self.pipelines.append(pipeline)
        self.num_large = sum(size == large_size for size in self.sizes)
        if len(self.sizes) < 2:
            raise ValueError(f"augmentations make {len(self.sizes)} crop; NeCo needs two or more.")
        self.min_overlap = min_overlap
        self.max_tries = max_tries

    def __call__(self, image: Image.Image) -> tuple[list[Tensor], Tensor]:
        """Crop, flip and augment; see the class docstring."""
        image = image.convert("RGB")
        boxes = sample_crop_boxes(
            image.height,
            image.width,
            self.scales,
            self.flip_probabilities,
            self.num_large,
            self.min_overlap,
            self.max_tries,
        )
        views = []
        for (x0, y0, x1, y1, flipped), size, pipeline in zip(
            boxes.tolist(), self.sizes, self.pipelines, strict=True
        ):
            view = v2.functional.resized_crop(
                image,
                int(y0),
                int(x0),
                int(y1 - y0),
                int(x1 - x0),
                [size, size],
                interpolation=InterpolationMode.BICUBIC,
            )
            if flipped:
                view = v2.functional.horizontal_flip(view)
            views.append(pipeline(view))
        return views, boxes

    def __repr__(self) -> str:
        return (
            f"BoxedMultiCrop(sizes={self.sizes}, scales={self.scales}, "
            f"flips={self.flip_probabilities}, min_overlap={self.min_overlap})"
        )


def _entry_value(entry: Mapping[str, Any], key: str, index: int) -> Any:
    """``entry[a][b]`` for ``key = "a.b"``, or a ``ValueError`` naming what is missing."""
    value: Any = entry
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ValueError(f"augmentations[{index}] lacks {key}.")
        value = value[part]
    return value
