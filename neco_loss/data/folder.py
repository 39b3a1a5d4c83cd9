"""``ImageFolder``: a user's own images, found recursively; unreadable files are skipped."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Larger images are skipped before they are decoded: 8192 x 8192 (RGB: 192 MiB decoded, before
# the crops of a step copy it). PIL's own limit (89.5 megapixels warns, 179 raises) would let
# one such file stop a run or, below it, take memory for every worker that reads it.
MAX_PIXELS = 8192 * 8192


def rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; 16- and 32-bit grey (``I;16``, ``I``, ``F``) scaled, not clipped.

    ``Image.convert("RGB")`` clips such images at 255: a 16-bit photo turns almost white.
    16-bit values are divided by 257 (65535 -> 255); 32-bit integer and float images, whose
    range is not fixed, are scaled from their minimum to their maximum.
    """
    if image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float64) / 257.0
    elif image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        low, high = float(values.min()), float(values.max())
        grey = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
    else:
        return image.convert("RGB")
    return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")


class ImageFolder(Dataset):
    """All images below ``root`` (any depth), as RGB PIL images; no labels.

    A file that cannot be decoded (whatever the decoder raises), or that has more than
    ``MAX_PIXELS`` pixels (a decompression bomb, say), is skipped (once per file) and counted
    in ``skipped``; the next readable image is returned in its place. 16-bit images are scaled
    to 8 bits (``rgb``). Each skip is a warning, or, with
    ``skip_log``, a line ``path<TAB>error`` appended to that file (which DataLoader worker
    processes share), so that a run can report them once at its end (``skipped_files``).

    Args:
        root: Folder to search.
        suffixes: File name endings that count as images (case-insensitive).
        skip_log: File to list skipped images in instead of warning.

    Raises:
        FileNotFoundError: If ``root`` does not exist or is not a folder.
        ValueError: If it holds no image files.

    """

    def __init__(
        self,
        root: str | Path,
        suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
        skip_log: Path | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.skip_log = skip_log
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is no folder.")
        self.files = sorted(
            path
            for path in self.root.rglob("*")
            if path.is_file() and path.suffix.lower() in suffixes
        )
        if not self.files:
            raise ValueError(
                f"no images ({', '.join(suffixes)}) found below {self.root}; point the dataset "
                "at a folder of images (sub-folders are searched)."
            )
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image:
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            if path in self.skipped:
                continue
            try:
                with Image.open(path) as image:  # reads the header only
                    width, height = image.size
                    if width * height > MAX_PIXELS:
                        raise ValueError(
                            f"{width} x {height} pixels, more than MAX_PIXELS = {MAX_PIXELS} "
                            "(neco_loss.data.folder)"
                        )
                    return rgb(image)
            # One file's decoding error, whatever its type (PIL raises OSError, ValueError,
            # SyntaxError, DecompressionBombError, struct.error, ...), costs that file only.
            except Exception as error:
                self.skipped.add(path)
                if self.skip_log is None:
                    warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
                else:
                    self.skip_log.parent.mkdir(parents=True, exist_ok=True)
                    with self.skip_log.open("a") as log:  # one short line: one write
                        log.write(f"{path}\t{str(error).splitlines()[0]}\n")
        raise ValueError(f"none of the {len(self.files)} images below {self.root} is readable.")


def skipped_files(skip_log: Path) -> list[str]:
    """The distinct paths listed in a ``skip_log`` (none if it does not exist)."""
    if not skip_log.is_file():
        return []
    lines = skip_log.read_text().splitlines()
    return sorted({line.split("\t")[0] for line in lines if line})
