"""Draw SyntheticScenes samples with their masks: docs/img/synthetic_scenes.png.

Run: python examples/synthetic_scenes_figure.py [--output PATH] [--count N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from neco_loss.data import CLASS_NAMES, SyntheticScenes


def draw(output: Path, count: int = 8, seed: int = 0) -> Path:
    """``count`` training scenes (top row) over their masks (bottom row), 8 px patch grid."""
    scenes = SyntheticScenes("train", 96, count, seed=seed)
    colours = plt.get_cmap("tab10", len(CLASS_NAMES))
    figure, axes = plt.subplots(2, count, figsize=(1.7 * count, 4.0))
    for column in range(count):
        image, mask = scenes[column]
        axes[0, column].imshow(image.permute(1, 2, 0).numpy())
        axes[1, column].imshow(mask.numpy(), cmap=colours, vmin=0, vmax=len(CLASS_NAMES) - 1)
        for axis in axes[:, column]:
            axis.set_xticks(range(-1, 96, 8), minor=True)  # the ViT's 8 px patches
            axis.set_yticks(range(-1, 96, 8), minor=True)
            axis.grid(which="minor", color="white", linewidth=0.3, alpha=0.5)
            axis.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    handles = [Patch(color=colours(i), label=name) for i, name in enumerate(CLASS_NAMES)]
    figure.legend(handles=handles, loc="lower center", ncol=len(CLASS_NAMES), fontsize=9)
    figure.suptitle("SyntheticScenes (96 px, 8 px patch grid): images and semantic masks")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=80)
    plt.close(figure)
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("docs/img/synthetic_scenes.png"))
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    print(f"wrote {draw(args.output, args.count)}")
