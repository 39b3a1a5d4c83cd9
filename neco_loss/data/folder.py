"""``ImageFolder``: a user's own images, found recursively; unreadable files are skipped."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class ImageFolder(Dataset):
    """All images below ``root`` (any depth), as RGB PIL images; no labels.

    A file that cannot be decoded is skipped (once per file) and counted in ``skipped``; the
    next readable image is returned in its place. Each skip is a warning, or, with
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
                with Image.open(path) as image:
                    return image.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError) as error:
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
