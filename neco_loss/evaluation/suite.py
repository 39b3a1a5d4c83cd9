"""Run the evaluation protocols on one or more backbones; write a table and pictures.

``neco eval PROTOCOL --checkpoint RUN [--checkpoint RUN2 ...]`` calls ``evaluate``: every
backbone is scored by the chosen protocols, the results go to ``results.md`` and
``results.json``, and the pictures show the backbones side by side (e.g. before / after NeCo).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neco_loss.evaluation.datasets import segmentation_dataset
from neco_loss.evaluation.figures import draw_retrieval, draw_segmentations
from neco_loss.evaluation.fractions import Subset
from neco_loss.evaluation.in_context import SegmentationDataset
from neco_loss.evaluation.linear import EPOCHS
from neco_loss.evaluation.protocols import PROTOCOLS, ProtocolInputs, ProtocolOutcome

SHOWN_IMAGES = 6
PER_IMAGE_FILE = "per_image.pt"


def evaluation_splits(
    dataset: str,
    data_root: str | Path | None,
    image_size: int,
    train_images: int = 0,
    val_images: int = 0,
    train_split: str = "train",
    val_split: str = "val",
    seed: int = 0,
    shuffle: bool = False,
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Training and validation sets of a named dataset, cut to N images each (0: all).

    ``seed`` draws the ``synthetic`` scenes, N of them (0: the split's default count). A real
    dataset is cut to its first N images, or with ``shuffle`` to N images drawn with ``seed``
    (each seed of an experiment scores its own).
    """
    splits = []
    for split, limit in ((train_split, train_images), (val_split, val_images)):
        data = segmentation_dataset(dataset, data_root, split, image_size, seed, limit or None)
        if not limit or limit >= len(data):
            splits.append(data)
            continue
        chosen: Sequence[int] = range(limit)
        if shuffle and dataset != "synthetic":  # synthetic scenes are drawn with the seed
            generator = torch.Generator().manual_seed(seed)
            chosen = torch.randperm(len(data), generator=generator)[:limit].tolist()
        splits.append(Subset(data, chosen))
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
    per_class: Mapping[str, Mapping[str, list[float]]] | None = None,
) -> tuple[Path, Path]:
    """``results.md`` (what was measured, then a table: backbones x metrics) and ``results.json``.

    Args:
        results: ``{backbone: {metric: value}}``.
        output: Folder to write to.
        context: What the numbers depend on (dataset, split sizes, checkpoints, protocol
            parameters); the package version and the time are added.
        per_class: ``{backbone: {protocol: IoU per class}}``, written to ``results.json``.

    Returns:
        The two paths. ``results.json`` holds ``{"results": ..., "context": ...,
        "per_class": ...}``.

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
    written = {"results": results, "context": context, "per_class": per_class or {}}
    data.write_text(json.dumps(written, indent=2, default=str))
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
    linear_epochs: int = EPOCHS,
    search: str = "torch",
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    context: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score every backbone with every protocol; write the table and the pictures.

    Args:
        backbones: ``{name: images -> patch maps}``.
        train_set: ``(image, mask)`` pairs: memory bank / linear training.
        val_set: ``(image, mask)`` pairs to score (overclustering uses only these).
        num_classes: Number of classes.
        protocols: Names in ``PROTOCOLS``.
        output: Folder for ``results.md``, ``results.json`` and PNGs.
        ignore_index: Label left out of the scores.
        clusters: Overclustering ``K`` values besides ``num_classes``.
        linear_epochs: Epochs of the linear head.
        search: In-context neighbour search, ``"torch"`` (exact) or ``"scann"``.
        progress: Show progress bars.
        class_names: Names for the figures' legends.
        context: What the results depend on (``write_results``), protocol parameters added.
        seed: Seed of the linear probe.

    Returns:
        ``{backbone: {metric: value}}``; ``results.json`` also holds the IoU per class
        (``per_class``), ``per_image.pt`` every scored image's pixel counts
        (``{backbone: {metric: (N, 3, C)}}``, ``miou.image_counts``).

    Raises:
        ValueError: For an unknown protocol, or a backbone whose features are not finite.

    """
    protocols = _chosen(protocols)
    inputs = ProtocolInputs(
        train_set,
        val_set,
        num_classes,
        ignore_index,
        min(SHOWN_IMAGES, len(val_set)),
        tuple(dict.fromkeys((num_classes, *clusters))),  # overclustering K, classes first
        linear_epochs,
        search,
        progress,
        seed,
    )
    outcomes = _score(backbones, protocols, inputs, output)
    _draw_predictions(outcomes, protocols, inputs, output, class_names)
    return _write_outcomes(outcomes, output, {**(context or {}), **_parameters(protocols, inputs)})


def _chosen(protocols: Sequence[str]) -> list[str]:
    """``protocols`` in table order (that of ``PROTOCOLS``); ``ValueError`` for unknown names."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"protocols must be among {list(PROTOCOLS)} but include {unknown}.")
    return [protocol for protocol in PROTOCOLS if protocol in protocols]


def _write_outcomes(
    outcomes: dict[str, dict[str, ProtocolOutcome]], output: Path, context: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Write the scores and per-class IoUs of every backbone (``write_results``); the scores."""
    results = {
        name: _merged(outcome.scores for outcome in row.values()) for name, row in outcomes.items()
    }
    per_class = {
        name: {
            protocol: outcome.per_class for protocol, outcome in row.items() if outcome.per_class
        }
        for name, row in outcomes.items()
    }
    write_results(results, output, context, per_class)
    per_image = {
        name: {
            metric: outcome.per_image
            for outcome in row.values()
            if outcome.per_image is not None
            for metric in outcome.scores
        }
        for name, row in outcomes.items()
    }
    torch.save(per_image, output / PER_IMAGE_FILE)
    return results


def _merged(scores: Iterable[dict[str, float]]) -> dict[str, float]:
    """One row of the results table: every protocol's metrics, in protocol order."""
    return {metric: value for row in scores for metric, value in row.items()}


def _score(
    backbones: Mapping[str, Callable[[Tensor], Tensor]],
    protocols: Sequence[str],
    inputs: ProtocolInputs,
    output: Path,
) -> dict[str, dict[str, ProtocolOutcome]]:
    """``{backbone: {protocol: outcome}}``; each backbone's retrieval figure on the way."""
    outcomes = {}
    for name, unchecked in backbones.items():
        features = _finite(name, unchecked)
        outcomes[name] = {protocol: PROTOCOLS[protocol](features, inputs) for protocol in protocols}
        draw_retrieval(features, inputs.val_set, output / f"retrieval_{_slug(name)}.png")
    return outcomes


def _draw_predictions(
    outcomes: dict[str, dict[str, ProtocolOutcome]],
    protocols: Sequence[str],
    inputs: ProtocolInputs,
    output: Path,
    class_names: Sequence[str] | None,
) -> None:
    """One figure per protocol that predicts class maps: the backbones' rows side by side."""
    images = torch.stack([inputs.val_set[i][0] for i in range(inputs.shown)])
    masks = torch.stack([inputs.val_set[i][1] for i in range(inputs.shown)])
    for protocol in protocols:
        drawn = {
            f"{name}{row[protocol].figure_label}": row[protocol] for name, row in outcomes.items()
        }
        predictions = {
            label: outcome.predictions
            for label, outcome in drawn.items()
            if outcome.predictions is not None
        }
        if not predictions:
            continue
        draw_segmentations(
            images,
            masks,
            predictions,
            inputs.num_classes,
            output / f"{protocol}.png",
            title=f"{protocol} predictions ({len(inputs.val_set)} validation images scored)",
            class_names=class_names,
            scores={
                label: outcome.figure_score
                for label, outcome in drawn.items()
                if outcome.figure_score is not None
            },
        )


def _parameters(protocols: Sequence[str], inputs: ProtocolInputs) -> dict[str, Any]:
    """The protocol parameters the results depend on, for ``results.json``."""
    parameters: dict[str, Any] = {
        "protocols": list(protocols),
        "train_images": len(inputs.train_set),
        "val_images": len(inputs.val_set),
        "num_classes": inputs.num_classes,
        "ignore_index": inputs.ignore_index,
    }
    if "overclustering" in protocols:
        parameters["clusters"] = list(inputs.clusters)
    if "linear" in protocols:
        parameters["linear_epochs"] = inputs.linear_epochs
    if "in-context" in protocols or "fractions" in protocols:
        parameters["search"] = inputs.search
    return parameters


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
