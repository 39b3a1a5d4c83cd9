"""What in-context mIoU on SyntheticScenes can reach: floors, the testbed backbone, a ceiling.

Scores, with the demo's protocol (memory bank: 200 training images, queries: 64 images of
``--split``, dataset seed ``--seed``):

- ``random ViT``: the testbed architecture at its random initialisation (seed 0);
- ``raw pixels``: each 8x8 patch's 192 pixel values as its feature;
- ``testbed backbone``: the shipped VICReg(L)-pretrained weights (``weights: testbed``);
- ``label oracle``: each patch's true class histogram as its feature, the ceiling that the
  8 px patch grid and bilinear upsampling leave.

Run: python benchmarks/synthetic_headroom.py [--split val] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from neco_loss.app.demo import EVAL_IMAGES, EVAL_TRAIN_IMAGES
from neco_loss.data import SyntheticScenes
from neco_loss.evaluation import in_context_miou
from neco_loss.evaluation.datasets import Normalized
from neco_loss.evaluation.in_context import patch_label_histograms
from neco_loss.testbed import testbed_backbone, testbed_vit

PATCH = 8
SIZE = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = Normalized(SyntheticScenes("train", SIZE, EVAL_TRAIN_IMAGES, seed=args.seed))
    scored = Normalized(SyntheticScenes(args.split, SIZE, EVAL_IMAGES, seed=args.seed))
    # The oracle looks each image's mask up by its pixel sum (distinct for distinct scenes).
    masks = {}
    for dataset in (train, scored):
        for index in range(len(dataset)):
            image, mask = dataset[index]
            masks[round(float(image.sum()), 2)] = mask

    def oracle(images: Tensor) -> Tensor:
        batch = torch.stack([masks[round(float(image.sum()), 2)] for image in images])
        grid = (SIZE // PATCH, SIZE // PATCH)
        histograms = patch_label_histograms(batch, grid, SyntheticScenes.num_classes)
        return histograms.transpose(1, 2).reshape(len(images), -1, *grid)

    def pixels(images: Tensor) -> Tensor:
        side = SIZE // PATCH
        return F.unfold(images, PATCH, stride=PATCH).view(len(images), -1, side, side)

    torch.manual_seed(0)
    features = {
        "random ViT": testbed_vit().eval(),
        "raw pixels": pixels,
        "testbed backbone": testbed_backbone(),
        "label oracle": oracle,
    }
    print(f"| features | in-context mIoU ({args.split}, seed {args.seed}) | seconds |")
    print("|---|---|---|")
    for name, function in features.items():
        start = time.perf_counter()
        with torch.no_grad():
            miou = in_context_miou(function, train, scored, SyntheticScenes.num_classes).miou
        print(f"| {name} | {miou:.4f} | {time.perf_counter() - start:.0f} |")


if __name__ == "__main__":
    main()
