"""Pictures of the evaluation: segmentations side by side, nearest-patch retrieval.

Needs matplotlib (``pip install 'neco-loss[eval]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from neco_loss.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from neco_loss.evaluation.in_context import SegmentationDataset

LEGEND_CLASSES = 24  # at most this many classes in a figure's legend


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def displayable(image: Tensor) -> Tensor:
    """``(H, W, 3)`` in [0, 1] from an ImageNet-normalised ``(3, H, W)`` image."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0)


def draw_segmentations(
    images: Tensor,
    masks: Tensor,
    predictions: dict[str, Tensor],
    num_classes: int,
    path: Path,
    title: str = "",
    class_names: Sequence[str] | None = None,
    scores: Mapping[str, float] | None = None,
) -> Path:
    """One column per image; rows: image, ground truth, then every named prediction.

    Args:
        images: ``(n, 3, H, W)`` normalised images.
        masks: ``(n, H, W)`` ground truth (255 drawn as black).
        predictions: ``{row title: (n, H', W') labels}`` (e.g. "before" and "after", or cluster
            maps, which are resized to the masks).
        num_classes: Classes for the colour map (cluster ids wrap around it).
        path: PNG to write.
        title: Figure title.
        class_names: Names for the legend (default ``class k``); the legend lists the classes
            the figure shows, at most ``LEGEND_CLASSES``.
        scores: ``{row title: mIoU}`` shown under the row titles.

    Returns:
        ``path``.

    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    rows = 2 + len(predictions)
    count = len(images)
    figure, axes = plt.subplots(rows, count, figsize=(1.9 * count, 1.9 * rows), squeeze=False)
    palette = max(num_classes, 2)  # colours; cluster ids wrap around them
    colours = plt.get_cmap("tab20", palette)
    panels = {"image": None, "ground truth": masks, **predictions}
    for row, (name, labels) in enumerate(panels.items()):
        for column in range(count):
            axis = axes[row, column]
            if labels is None:
                axis.imshow(displayable(images[column]).numpy())
            else:
                shown = labels[column][None, None].float()
                shown = F.interpolate(shown, size=masks.shape[-2:], mode="nearest")[0, 0]
                masked = torch.where(shown == 255, float("nan"), shown % palette)
                axis.imshow(masked.numpy(), cmap=colours, vmin=0, vmax=palette - 1)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                score = (scores or {}).get(name)
                axis.set_ylabel(name if score is None else f"{name}\nmIoU {score:.3f}")
    shown_classes = torch.cat([masks.flatten(), *(p.flatten() for p in predictions.values())])
    present = [int(c) for c in shown_classes.unique() if c != 255][:LEGEND_CLASSES]
    names = class_names or [f"class {k}" for k in range(palette)]
    handles = [Patch(color=colours(k % palette), label=names[k % len(names)]) for k in present]
    figure.legend(handles=handles, loc="center right", fontsize="small", title="classes")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    return _save(figure, path)


@torch.no_grad()
def draw_retrieval(
    features: Callable[[Tensor], Tensor],
    dataset: SegmentationDataset,
    path: Path,
    *,
    query: tuple[int, int, int] = (0, -1, -1),
    neighbours: int = 8,
    images: int = 64,
) -> Path:
    """The paper's Figure 4: a query patch and its nearest patches across the dataset.

    Args:
        features: Images -> patch maps ``(B, D, h, w)``.
        dataset: ``(image, mask)`` pairs; the first ``images`` are searched.
        path: PNG to write.
        query: ``(image, row, column)`` of the query patch; ``-1`` means the centre.
        neighbours: Nearest patches to show (other images only).
        images: How many images to search.

    Returns:
        ``path``.

    """
    plt = _pyplot()
    pictures = torch.stack([dataset[i][0] for i in range(min(images, len(dataset)))])
    maps = torch.cat(
        [features(pictures[i : i + 16]).float().cpu() for i in range(0, len(pictures), 16)]
    )
    image_index, row, column = query
    count, _, height, width = maps.shape
    row = height // 2 if row < 0 else row
    column = width // 2 if column < 0 else column
    order, best, where = _nearest_patches(maps, image_index, row * width + column, neighbours)
    figure, axes = plt.subplots(1, 1 + len(order), figsize=(2.0 * (1 + len(order)), 2.3))
    scale_y, scale_x = pictures.shape[2] / height, pictures.shape[3] / width
    shown = [(image_index, row * width + column, 1.0)] + [
        (int(i), int(where[i]), float(best[i])) for i in order
    ]
    for axis, (index, token, score) in zip(axes, shown, strict=True):
        axis.imshow(displayable(pictures[index]).numpy())
        y, x = divmod(token, width)
        axis.add_patch(
            plt.Rectangle(
                (x * scale_x, y * scale_y),
                scale_x,
                scale_y,
                fill=False,
                edgecolor="red",
                linewidth=2,
            )
        )
        axis.set_title("query" if index == image_index and score == 1.0 else f"{score:.2f}")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"nearest patches of a query patch among {count} images (cosine similarity)")
    figure.tight_layout()
    return _save(figure, path)


def _nearest_patches(
    maps: Tensor, image_index: int, token: int, neighbours: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The images whose best patch is nearest to the query token, in other images only.

    Returns:
        ``(order, best, where)``: the ``neighbours`` nearest images, every image's best cosine
        similarity and the index of its best patch.

    """
    tokens = F.normalize(maps.flatten(2).transpose(1, 2), dim=-1)  # (n, h * w, D)
    similarity = tokens @ tokens[image_index, token]  # (n, h * w)
    similarity[image_index] = -2  # other images only
    best, where = similarity.max(dim=1)
    return best.argsort(descending=True)[:neighbours], best, where


def _save(figure: Any, path: Path) -> Path:
    """Write ``figure`` to ``path`` (its folder made) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    return path
