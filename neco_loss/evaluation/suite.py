"""Run the evaluation protocols on one or more backbones; write a table and pictures.

``neco eval PROTOCOL --checkpoint RUN [--checkpoint RUN2 ...]`` calls ``evaluate``: every
backbone is scored by the chosen protocols, the results go to ``results.md`` and
``results.json``, and the pictures show the backbones side by side (e.g. before / after NeCo).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neco_loss.evaluation.datasets import segmentation_dataset
from neco_loss.evaluation.figures import draw_retrieval, draw_segmentations
from neco_loss.evaluation.fractions import Subset, in_context_fractions
from neco_loss.evaluation.in_context import SegmentationDataset, in_context_miou
from neco_loss.evaluation.linear import linear_segmentation_miou
from neco_loss.evaluation.overclustering import overclustering_miou

PROTOCOLS = ("in-context", "linear", "overclustering", "fractions")
SHOWN_IMAGES = 6


def evaluation_splits(
    dataset: str,
    data_root: str | Path | None,
    image_size: int,
    train_images: int = 0,
    val_images: int = 0,
    train_split: str = "train",
    val_split: str = "val",
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Training and validation sets of a named dataset, cut to the first N images (0: all)."""
    splits = []
    for split, limit in ((train_split, train_images), (val_split, val_images)):
        data = segmentation_dataset(dataset, data_root, split, image_size)
        splits.append(Subset(data, range(min(limit, len(data)))) if limit else data)
    return splits[0], splits[1]


def run_context(context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``context`` (what results depend on) with the package version and the time added."""
    return {
        **(context or {}),
        "neco_loss_version": version("neco-loss"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_results(
    results: dict[str, dict[str, float]],
    output: Path,
    context: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """``results.md`` (what was measured, then a table: backbones x metrics) and ``results.json``.

    Args:
        results: ``{backbone: {metric: value}}``.
        output: Folder to write to.
        context: What the numbers depend on (dataset, split sizes, checkpoints, protocol
            parameters); the package version and the time are added.

    Returns:
        The two paths. ``results.json`` holds ``{"results": ..., "context": ...}``.

    """
    output.mkdir(parents=True, exist_ok=True)
    context = run_context(context)
    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    lines = [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", "| backbone | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[m]:.4f}" if m in row else "-" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    markdown, data = output / "results.md", output / "results.json"
    markdown.write_text("\n".join(lines) + "\n")
    data.write_text(json.dumps({"results": results, "context": context}, indent=2, default=str))
    return markdown, data


def evaluate(
    backbones: Mapping[str, Callable[[Tensor], Tensor]],
    train_set: SegmentationDataset,
    val_set: SegmentationDataset,
    num_classes: int,
    protocols: Sequence[str],
    output: Path,
    *,
    ignore_index: int | None = None,
    clusters: Sequence[int] = (100, 300, 500),
    linear_epochs: int = 20,
    search: str = "torch",
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Score every backbone with every protocol; write the table and the pictures.

    Args:
        backbones: ``{name: images -> patch maps}``.
        train_set: ``(image, mask)`` pairs: memory bank / linear training.
        val_set: ``(image, mask)`` pairs to score (overclustering uses only these).
        num_classes: Number of classes.
        protocols: Some of ``PROTOCOLS``.
        output: Folder for ``results.md``, ``results.json`` and PNGs.
        ignore_index: Label left out of the scores.
        clusters: Overclustering ``K`` values besides ``num_classes``.
        linear_epochs: Epochs of the linear head.
        search: In-context neighbour search, ``"torch"`` (exact) or ``"scann"``.
        progress: Show progress bars.
        class_names: Names for the figures' legends.
        context: What the results depend on, written with them (``write_results``); the
            protocol parameters are added.

    Returns:
        ``{backbone: {metric: value}}``.

    Raises:
        ValueError: For an unknown protocol, or a backbone whose features are not finite.

    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"protocols must be among {list(PROTOCOLS)} but include {unknown}.")
    counts = tuple(dict.fromkeys((num_classes, *clusters)))  # overclustering K, classes first
    shown = min(SHOWN_IMAGES, len(val_set))
    images = torch.stack([val_set[i][0] for i in range(shown)])
    masks = torch.stack([val_set[i][1] for i in range(shown)])
    results: dict[str, dict[str, float]] = {}
    pictures: dict[str, dict[str, Tensor]] = {protocol: {} for protocol in protocols}
    for name, unchecked in backbones.items():
        features = _finite(name, unchecked)
        row: dict[str, float] = {}
        if "in-context" in protocols:
            result = in_context_miou(
                features,
                train_set,
                val_set,
                num_classes,
                ignore_index=ignore_index,
                keep_predictions=shown,
                search=search,
                progress=progress,
            )
            row["in-context mIoU"] = result.miou
            pictures["in-context"][name] = result.predictions
        if "linear" in protocols:
            linear = linear_segmentation_miou(
                features,
                train_set,
                val_set,
                num_classes,
                epochs=linear_epochs,
                ignore_index=ignore_index,
                keep_predictions=shown,
                progress=progress,
            )
            row["linear mIoU"] = linear.miou
            pictures["linear"][name] = linear.predictions
        if "overclustering" in protocols:
            clustered = overclustering_miou(
                features, val_set, num_classes, counts, ignore_index=ignore_index, progress=progress
            )
            for k, value in clustered.miou.items():
                row[f"overclustering K={k}"] = value
            # Clusters coloured by the class they were matched to.
            pictures["overclustering"][f"{name} K={counts[-1]}"] = clustered.matched_maps[
                counts[-1]
            ][:shown]
        if "fractions" in protocols:
            for fraction, value in in_context_fractions(
                features,
                train_set,
                val_set,
                num_classes,
                ignore_index=ignore_index,
            ).items():
                row[f"in-context 1/{round(1 / fraction)}"] = value
        results[name] = row
        draw_retrieval(features, val_set, output / f"retrieval_{_slug(name)}.png")
    scores = {
        "in-context": {name: row.get("in-context mIoU") for name, row in results.items()},
        "linear": {name: row.get("linear mIoU") for name, row in results.items()},
        "overclustering": {  # the figure shows each backbone's clusters at the largest K
            f"{name} K={counts[-1]}": row.get(f"overclustering K={counts[-1]}")
            for name, row in results.items()
        },
    }
    for protocol, predictions in pictures.items():
        if predictions:
            draw_segmentations(
                images,
                masks,
                predictions,
                num_classes,
                output / f"{protocol}.png",
                title=f"{protocol} predictions ({len(val_set)} validation images scored)",
                class_names=class_names,
                scores={k: v for k, v in scores[protocol].items() if v is not None},
            )
    parameters = {
        "protocols": list(protocols),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "num_classes": num_classes,
        "ignore_index": ignore_index,
    }
    if "overclustering" in protocols:
        parameters["clusters"] = list(counts)
    if "linear" in protocols:
        parameters["linear_epochs"] = linear_epochs
    if "in-context" in protocols or "fractions" in protocols:
        parameters["search"] = search
    write_results(results, output, {**(context or {}), **parameters})
    return results


def _finite(name: str, features: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``features`` that raise instead of returning NaN or Inf (no score of garbage).

    Raises:
        ValueError: On the first batch whose features are not all finite, naming the backbone.

    """

    def checked(images: Tensor) -> Tensor:
        maps = features(images)
        if not torch.isfinite(maps).all():
            raise ValueError(
                f"backbone {name!r} gives non-finite features (NaN or Inf) on the evaluation "
                "images; there is nothing to score."
            )
        return maps

    return checked


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
