"""Shared by the two lightly examples: the backbone and the dataset chosen by flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightly.data import LightlyDataset, MultiViewCollate
from neco_loss.integrations.lightly import NeCoTransform

from neco_loss.data import SyntheticScenes
from neco_loss.models import DenseViT

# A DINOv2-registers ViT-S shrunk for CPU: 8 px patches, width 96, depth 4.
TINY_VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a folder of images")
    parser.add_argument(
        "--dinov2",
        action="store_true",
        help="DINOv2-registers ViT-S/14 (timm, pretrained: needs internet once)",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/lightly"), help="where backbone.pt goes"
    )
    return parser.parse_args()


def save_backbone(backbone: DenseViT, output: Path) -> None:
    """Write the trained student backbone where ``DenseViT(checkpoint=)`` and ``neco eval`` read
    it (``--checkpoint PATH --config`` with a config naming the same model)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "backbone.pt"
    torch.save(backbone.vit.state_dict(), path)
    print(f"student backbone weights saved to {path}")


def backbone_and_transform(args: argparse.Namespace) -> tuple[DenseViT, NeCoTransform]:
    if args.dinov2:  # the reference setting: 224 / 98 px crops of a pretrained ViT-S/14
        backbone = DenseViT(
            "vit_small_patch14_reg4_dinov2.lvd142m", pretrained=True, drop_path_rate=0.1
        )
        return backbone, NeCoTransform()
    return DenseViT("vit_small_patch14_reg4_dinov2", **TINY_VIT), NeCoTransform(
        global_crop_size=64, local_crop_size=32
    )


class SyntheticForLightly:
    """``SyntheticScenes`` images as lightly datasets yield them: (views, target, filename)."""

    def __init__(self, transform: NeCoTransform, length: int = 512) -> None:
        self.scenes = SyntheticScenes("train", size=96, length=length)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        image, _ = self.scenes[index]
        return self.transform(image), 0, f"scene_{index}"


def dataloader(args: argparse.Namespace, transform: NeCoTransform) -> torch.utils.data.DataLoader:
    """Synthetic scenes or ``LightlyDataset(args.data)``, batched with ``MultiViewCollate``."""
    if args.data == "synthetic":
        data = SyntheticForLightly(transform)
    else:
        data = LightlyDataset(input_dir=args.data, transform=transform)
    return torch.utils.data.DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        collate_fn=MultiViewCollate(),
    )
