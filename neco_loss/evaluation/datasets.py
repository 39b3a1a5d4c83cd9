"""Segmentation datasets from local folders in their standard layouts, and the built-in one.

Every dataset returns ``(image (3, S, S) ImageNet-normalised, mask (S, S) int64)`` with images
resized bilinearly and masks by nearest neighbour to ``S = image_size``; 255 marks ignored
pixels. Class definitions follow the NeCo / Leopart evaluation code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from neco_loss.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from neco_loss.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from neco_loss.data.synthetic import SyntheticScenes

IGNORE_INDEX = 255
NUM_CLASSES = {"voc": 21, "ade20k": 150, "coco-things": 12, "coco-stuff": 15, "synthetic": 5}
DATASETS = [*NUM_CLASSES, "folder"]  # folder: your own images and masks, LAYOUTS["folder"]
# Class names for figure legends, where the dataset fixes them (others: "class k").
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "synthetic": SYNTHETIC_CLASS_NAMES,
    "voc": (  # Pascal VOC 2012 label order
        "background",
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ),
}
LAYOUTS = {
    "voc": "ROOT/JPEGImages/*.jpg, ROOT/SegmentationClass/*.png (SegmentationClassAug for "
    "trainaug), ROOT/ImageSets/Segmentation/{train,trainaug,val}.txt (ROOT = VOCdevkit/VOC2012)",
    "ade20k": "ROOT/images/{training,validation}/*.jpg, ROOT/annotations/{training,validation}/"
    "*.png (ROOT = ADEChallengeData2016)",
    "coco-things": "ROOT/images/{train,val}2017/*.jpg, ROOT/annotations/{train,val}2017/*.png "
    "(panoptic semantic PNGs), ROOT/annotations/panoptic_annotations/panoptic_val2017.json",
    "coco-stuff": "ROOT/images/{train,val}2017/*.jpg, ROOT/annotations/stuff_annotations/"
    "stuff_{train,val}2017_pixelmaps/*.png, ROOT/annotations/stuff_annotations/stuff_val2017.json",
    "folder": "ROOT/classes.txt (one class name per line; line k names class k), "
    "ROOT/<split>/images/*.{jpg,jpeg,png}, ROOT/<split>/masks/<image name>.png (class index per "
    "pixel, 255 ignored), e.g. splits train and val",
}
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class Normalized:
    """``(image, mask)`` pairs of ``dataset`` with ImageNet-normalised images.

    Args:
        dataset: Returns ``(image (3, H, W) in [0, 1], mask (H, W))``.

    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.dataset[index]
        return self.normalize(image), mask


class ImageMaskPairs:
    """Image files with label PNGs, relabelled through a lookup table.

    Args:
        images: Image paths.
        masks: Label PNG paths, one per image.
        lookup: ``(256,)`` int64: stored label value -> class index or 255.
        image_size: Output side ``S``.
        classes: With a number, a stored value that is neither a class index below it nor 255
            is refused (your own masks); ``None``: the lookup decides (public datasets).

    """

    def __init__(
        self,
        images: list[Path],
        masks: list[Path],
        lookup: Tensor,
        image_size: int,
        classes: int | None = None,
    ) -> None:
        self.images = images
        self.masks = masks
        self.lookup = lookup
        self.image_size = image_size
        self.classes = classes
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        size = [self.image_size, self.image_size]
        with Image.open(self.images[index]) as image:
            pixels = v2.functional.pil_to_tensor(image.convert("RGB"))
        with Image.open(self.masks[index]) as mask_image:
            labels = torch.from_numpy(np.array(mask_image)).long()
        if self.classes is not None:
            unknown = labels[(labels >= self.classes) & (labels != IGNORE_INDEX)].unique()
            if len(unknown) or labels.dim() != 2:
                raise ValueError(
                    f"mask {self.masks[index]} must hold class indices 0..{self.classes - 1} "
                    f"or {IGNORE_INDEX} in one channel, but holds {unknown[:5].tolist()} "
                    f"(shape {tuple(labels.shape)})."
                )
        pixels = v2.functional.resize(pixels, size, antialias=True).float() / 255
        labels = v2.functional.resize(labels[None], size, v2.InterpolationMode.NEAREST)[0]
        return self.normalize(pixels), self.lookup[labels.clamp(0, 255)]


def _require(path: Path, name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist. Expected layout: {LAYOUTS[name]}")
    return path


def _lookup(mapping: dict[int, int], default: int = IGNORE_INDEX) -> Tensor:
    table = torch.full((256,), default, dtype=torch.long)
    for value, label in mapping.items():
        if 0 <= value < 256:
            table[value] = label
    return table


def pascal_voc(root: Path, split: str, image_size: int) -> ImageMaskPairs:
    """Pascal VOC 2012: 21 classes (background + 20), 255 ignored.

    ``trainaug`` uses the SBD-augmented masks in ``SegmentationClassAug``.
    """
    list_file = _require(root / "ImageSets" / "Segmentation" / f"{split}.txt", "voc")
    mask_dir = _require(
        root / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass"), "voc"
    )
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    images = [_require(root / "JPEGImages" / f"{name}.jpg", "voc") for name in names]
    masks = [_require(mask_dir / f"{name}.png", "voc") for name in names]
    return ImageMaskPairs(images, masks, _lookup({v: v for v in range(21)}), image_size)


def ade20k(root: Path, split: str, image_size: int) -> ImageMaskPairs:
    """ADE20K (SceneParsing): 150 classes stored as 1..150, 0 ignored."""
    folder = {"train": "training", "val": "validation"}.get(split, split)
    masks = sorted(_require(root / "annotations" / folder, "ade20k").glob("*.png"))
    images = [_require(root / "images" / folder / f"{m.stem}.jpg", "ade20k") for m in masks]
    return ImageMaskPairs(images, masks, _lookup({v: v - 1 for v in range(1, 151)}), image_size)


def coco(root: Path, split: str, image_size: int, kind: str) -> ImageMaskPairs:
    """COCO-Things (12 thing super-categories) or COCO-Stuff (15 stuff super-categories).

    The Leopart / NeCo definitions: super-categories sorted by name; for stuff, ``other`` and
    the things (stored as 0) are ignored; for things, stuff and unlabelled (0) are ignored.
    """
    name = f"coco-{kind}"
    if kind == "things":
        mask_dir = root / "annotations" / f"{split}2017"
        categories_file = root / "annotations" / "panoptic_annotations" / "panoptic_val2017.json"
    else:
        mask_dir = root / "annotations" / "stuff_annotations" / f"stuff_{split}2017_pixelmaps"
        categories_file = root / "annotations" / "stuff_annotations" / "stuff_val2017.json"
    categories = json.loads(_require(categories_file, name).read_text())["categories"]
    if kind == "things":
        supers = sorted({c["supercategory"] for c in categories if c.get("isthing") == 1})
        mapping = {
            c["id"]: supers.index(c["supercategory"]) for c in categories if c.get("isthing") == 1
        }
    else:
        supers = sorted({c["supercategory"] for c in categories} - {"other"})
        mapping = {
            c["id"]: supers.index(c["supercategory"])
            for c in categories
            if c["supercategory"] != "other"
        }
    masks = sorted(_require(mask_dir, name).glob("*.png"))
    images = [_require(root / "images" / f"{split}2017" / f"{m.stem}.jpg", name) for m in masks]
    return ImageMaskPairs(images, masks, _lookup(mapping), image_size)


def segmentation_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    image_size: int,
    seed: int = 0,
    scenes: int | None = None,
) -> Any:
    """A dataset by name (``DATASETS``); ``folder`` is your own images and masks.

    ``seed`` and ``scenes`` (how many to draw; ``None``: the split's default) apply to
    ``synthetic``, whose scenes are drawn rather than read; a real dataset has its files.

    Raises:
        ValueError: For an unknown name, or a missing ``root`` for a real dataset.
        FileNotFoundError: If files are missing (the message shows the expected layout).

    """
    if name == "synthetic":
        # SyntheticScenes refuses a split it does not have
        return Normalized(SyntheticScenes(split, image_size, length=scenes, seed=seed))
    if name not in LAYOUTS:
        raise ValueError(f"dataset must be one of {DATASETS} but is {name!r}.")
    if root is None:
        raise ValueError(
            f"dataset {name!r} needs its folder: give --data-root (data_root=). Expected "
            f"layout: {LAYOUTS[name]}"
        )
    path = Path(root).expanduser()
    if name == "voc":
        return pascal_voc(path, split, image_size)
    if name == "ade20k":
        return ade20k(path, split, image_size)
    if name == "folder":
        return image_folder_pairs(path, split, image_size)
    return coco(path, split, image_size, name.removeprefix("coco-"))


def dataset_classes(name: str, root: str | Path | None) -> tuple[int, tuple[str, ...] | None]:
    """The number of classes of a dataset and their names where they are known.

    ``folder`` reads them from ``ROOT/classes.txt``.

    Raises:
        ValueError: For an unknown name or a ``folder`` without ``root``.
        FileNotFoundError: For a ``folder`` without ``classes.txt``.

    """
    if name != "folder":
        if name not in NUM_CLASSES:
            raise ValueError(f"dataset must be one of {DATASETS} but is {name!r}.")
        return NUM_CLASSES[name], CLASS_NAMES.get(name)
    if root is None:
        raise ValueError(f"dataset 'folder' needs its folder: give --data-root. {LAYOUTS[name]}")
    listing = _require(Path(root).expanduser() / "classes.txt", "folder")
    names = tuple(line.strip() for line in listing.read_text().splitlines() if line.strip())
    if len(names) < 2:
        raise ValueError(f"{listing} must name at least 2 classes but names {len(names)}.")
    return len(names), names


def image_folder_pairs(root: Path, split: str, image_size: int) -> ImageMaskPairs:
    """Your own labelled images (``LAYOUTS["folder"]``): masks hold class indices, 255 ignored.

    Raises:
        FileNotFoundError: If the split's folders are missing or an image has no mask.
        ValueError: If the split has no images; when read, a mask holding a value that is no
            class index and not 255.

    """
    count, _ = dataset_classes("folder", root)
    folder = _require(root / split / "images", "folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(FOLDER_IMAGE_SUFFIXES)}).")
    masks = [_require(root / split / "masks" / f"{image.stem}.png", "folder") for image in images]
    return ImageMaskPairs(images, masks, _lookup({v: v for v in range(count)}), image_size, count)
