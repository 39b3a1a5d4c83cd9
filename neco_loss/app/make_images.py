"""``neco make-images FOLDER``: synthetic scenes as PNG files, for tools that read folders."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "make-images"
HELP = "write synthetic scenes as PNG files, for tools that read folders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The folder, ``--count``, ``--size``, ``--seed``."""
    parser.add_argument("folder", type=Path, help="where the PNG files go")
    parser.add_argument("--count", type=int, default=64, help="number of images")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes")


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Write the images; print how many went where."""
    from neco_loss.data.synthetic import save_scenes

    paths = save_scenes(args.folder, args.count, args.size, args.seed)
    print(f"wrote {len(paths)} images to {args.folder}")
