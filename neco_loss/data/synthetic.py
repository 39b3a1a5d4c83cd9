"""``SyntheticScenes``: the built-in dataset, drawn procedurally, with semantic masks.

Four object classes on a textured background. Each class has its own shape and texture family
and a preferred colour family, but every object varies strongly: size, aspect, rotation,
texture frequency, a second colour of random hue, brightness, and occlusion by other objects.
Colour alone is therefore an unreliable cue; shape and texture, which need context beyond one
pixel, disambiguate. Image ``i`` of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from neco_loss.checks import check_choice

CLASS_NAMES = ("background", "disc", "box", "triangle", "ring")
# "val" is for choosing settings, "test" for the numbers reported with them (docs/training.md).
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTH = {"train": 512, "val": 96, "test": 96}
HUE_FAMILY = {1: 0.02, 2: 0.62, 3: 0.33, 4: 0.82}  # red, blue, green, magenta
HUE_SPREAD = 0.12  # +- around the family hue: neighbouring families overlap in colour


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """``(3, ...)`` RGB in [0, 1] from broadcastable HSV tensors in [0, 1]."""
    hue, saturation, value = torch.broadcast_tensors(hue % 1.0, saturation, value)
    k = torch.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6])
    return value - value * saturation * (torch.minimum(k, 4 - k).clamp(0, 1))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class SyntheticScenes(Dataset):
    """Procedural scenes with ground-truth semantic masks; no files needed.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        size: Side of the square images in pixels.
        length: Number of images (default 512 train, 96 val).
        seed: Seed of the whole dataset.
        max_objects: Objects per image are drawn from ``2 .. max_objects``.

    Returns (per item):
        ``image (3, size, size)`` float in [0, 1] and ``mask (size, size)`` int64 class indices
        (0 = background, ``CLASS_NAMES``).

    Examples:
        >>> image, mask = SyntheticScenes("val", size=64)[0]
        >>> image.shape, mask.shape, int(mask.max()) < len(CLASS_NAMES)
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), True)

    """

    num_classes = len(CLASS_NAMES)

    def __init__(
        self,
        split: str = "train",
        size: int = 96,
        length: int | None = None,
        seed: int = 0,
        max_objects: int = 5,
    ) -> None:
        check_choice(split, "split", SPLITS)
        for name, value, low in (("size", size, 16), ("max_objects", max_objects, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low} but is {value!r}.")
        self.split = split
        self.size = size
        self.length = DEFAULT_LENGTH[split] if length is None else length
        if self.length < 1:
            raise ValueError(f"length must be >= 1 but is {self.length}.")
        self.seed = seed
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images.")
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + SPLITS[self.split]) * 10_000_019 + index
        )
        ys, xs = torch.meshgrid(
            torch.arange(self.size, dtype=torch.float32) + 0.5,
            torch.arange(self.size, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        image = self._background(xs, ys, generator)
        mask = torch.zeros(self.size, self.size, dtype=torch.long)
        objects = int(torch.randint(2, self.max_objects + 1, (), generator=generator))
        for _ in range(objects):
            label = int(torch.randint(1, len(CLASS_NAMES), (), generator=generator))
            inside, u, v = self._shape(label, xs, ys, generator)
            image = torch.where(inside, self._texture(label, u, v, generator), image)
            mask[inside] = label
        noise = 0.03 * torch.randn(image.shape, generator=generator)
        return (image + noise).clamp(0, 1), mask

    def _background(self, xs: Tensor, ys: Tensor, generator: torch.Generator) -> Tensor:
        field = torch.zeros_like(xs)
        for _ in range(3):
            angle = _uniform(generator, 0, math.pi)
            frequency = _uniform(generator, 0.02, 0.12)
            phase = _uniform(generator, 0, 2 * math.pi)
            direction = xs * math.cos(angle) + ys * math.sin(angle)
            field = field + torch.sin(direction * frequency * 2 * math.pi / 4 + phase)
        value = 0.45 + 0.12 * field / 3 + _uniform(generator, -0.15, 0.25)
        hue = torch.tensor(_uniform(generator, 0, 1))
        saturation = torch.tensor(_uniform(generator, 0.05, 0.45))
        return _hsv_to_rgb(hue, saturation, value.clamp(0, 1))

    def _shape(
        self, label: int, xs: Tensor, ys: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pixels inside the object, and the object's rotated coordinates (u, v)."""
        radius = _uniform(generator, 0.13, 0.3) * self.size
        cx = _uniform(generator, 0.1, 0.9) * self.size
        cy = _uniform(generator, 0.1, 0.9) * self.size
        angle = _uniform(generator, 0, 2 * math.pi)
        aspect = _uniform(generator, 0.55, 1.0)
        u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
        v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
        if label == 1:  # disc: a filled ellipse
            inside = (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1
        elif label == 2:  # box: a rotated rectangle
            inside = (u.abs() <= radius) & (v.abs() <= radius * aspect)
        elif label == 3:  # triangle: three half-planes
            inside = torch.ones_like(u, dtype=torch.bool)
            for corner in range(3):
                theta = corner * 2 * math.pi / 3
                inside &= u * math.cos(theta) + v * math.sin(theta) <= radius * 0.5
        else:  # ring: an elliptic annulus
            distance = (u / radius) ** 2 + (v / (radius * aspect)) ** 2
            inside = (distance <= 1) & (distance >= _uniform(generator, 0.2, 0.45))
        return inside, u, v

    def _texture(self, label: int, u: Tensor, v: Tensor, generator: torch.Generator) -> Tensor:
        """``(3, H, W)`` two-tone texture of the class's family."""
        period = _uniform(generator, 3.0, 7.0)
        phase = _uniform(generator, 0, 2 * math.pi)
        a, b = u * 2 * math.pi / period + phase, v * 2 * math.pi / period
        if label == 1:  # polka dots
            pattern = (torch.cos(a) * torch.cos(b) > 0.4).float()
        elif label == 2:  # stripes
            pattern = (torch.sin(a) > 0).float()
        elif label == 3:  # checkerboard
            pattern = (torch.sin(a) * torch.sin(b) > 0).float()
        else:  # speckle
            pattern = (torch.rand(u.shape, generator=generator) > 0.5).float()
        hue = HUE_FAMILY[label] + _uniform(generator, -HUE_SPREAD, HUE_SPREAD)
        primary = _hsv_to_rgb(
            torch.tensor(hue),
            torch.tensor(_uniform(generator, 0.45, 1.0)),
            torch.tensor(_uniform(generator, 0.45, 1.0)),
        )
        secondary = _hsv_to_rgb(
            torch.tensor(_uniform(generator, 0, 1)),
            torch.tensor(_uniform(generator, 0.0, 0.8)),
            torch.tensor(_uniform(generator, 0.1, 0.95)),
        )
        return primary[:, None, None] * pattern + secondary[:, None, None] * (1 - pattern)


def save_scenes(folder: str | Path, count: int, size: int = 96, seed: int = 0) -> list[Path]:
    """Write ``count`` training ``SyntheticScenes`` as PNG files into ``folder`` (flat).

    For tools that read image folders (solo-learn's ``custom`` dataset, lightly's
    ``LightlyDataset``, ``neco train --dataset``).

    Returns:
        The written paths, ``scene_00000.png`` onwards.

    Raises:
        ValueError: If ``count`` < 1.

    """
    from torchvision.transforms.v2.functional import to_pil_image

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1 but is {count!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes("train", size=size, length=count, seed=seed)
    paths = []
    for index in range(count):
        path = folder / f"scene_{index:05d}.png"
        to_pil_image(scenes[index][0]).save(path)
        paths.append(path)
    return paths
