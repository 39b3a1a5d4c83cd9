"""``neco ablate``: train variants of a configuration, evaluate each, one table and one plot.

An ablation file names a base configuration and the variants as overrides of it::

    base: ../recipes/tiny_cpu.yaml        # relative to the ablation file
    variants:
      CE: {}
      L1: {loss: {loss: l1}}
    evaluation: {train_images: 200, val_images: 64, linear_epochs: 10}

Every variant trains into ``OUTPUT/<variant>`` and is scored by the in-context and linear
protocols on ``SyntheticScenes`` (or ``evaluation.dataset`` with ``data_root``); the results go
to ``OUTPUT/ablation.md``, ``ablation.json`` and ``ablation.png``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml

from neco_loss.evaluation.datasets import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from neco_loss.evaluation.suite import evaluate, evaluation_splits, write_results
from neco_loss.models import DenseViT
from neco_loss.training import build_config
from neco_loss.training.checkpoint import LAST
from neco_loss.training.distributed import launch

EVALUATION_DEFAULTS: dict[str, Any] = {
    "dataset": "synthetic",
    "data_root": None,
    "image_size": None,
    "train_images": 200,
    "val_images": 64,
    "linear_epochs": 10,
    "protocols": ["in-context", "linear"],
}


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; nested mappings are merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_ablation(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """``(base config, variants, evaluation settings)`` of an ablation file.

    Raises:
        FileNotFoundError: If the file or its base config does not exist.
        ValueError: If it lacks ``base`` or ``variants`` or has unknown keys.

    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ablation file {path} does not exist.")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - {"base", "variants", "evaluation"})
    if unknown or "base" not in spec or not spec.get("variants"):
        raise ValueError(
            f"ablation file {path} needs 'base' and 'variants' (and may have 'evaluation'); "
            f"unknown keys: {unknown}."
        )
    base = spec["base"]
    if isinstance(base, str):
        base_path = (path.parent / base).expanduser()
        if not base_path.is_file():
            raise FileNotFoundError(f"base config {base_path} of {path} does not exist.")
        base = yaml.safe_load(base_path.read_text()) or {}
    evaluation = merge(EVALUATION_DEFAULTS, spec.get("evaluation") or {})
    unknown = sorted(set(evaluation) - set(EVALUATION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown evaluation keys {unknown}; valid: {list(EVALUATION_DEFAULTS)}.")
    return base, dict(spec["variants"]), evaluation


def run_ablation(
    path: Path, output: Path, overrides: list[str] | None = None, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Train and evaluate every variant; write the table and the plot; return the results."""
    base, variants, settings = load_ablation(path)
    configs = {}
    for name, changes in variants.items():  # every variant is validated before any training
        data = merge(base, {**(changes or {}), "output_dir": str(output / name)})
        configs[name] = build_config(data, overrides)
    backbones = {}
    for name, config in configs.items():
        print(f"== variant {name}")
        # A variant trained before (an interrupted or repeated ablation) is continued, or
        # reused when it finished; one whose settings changed is refused by resume.
        resume = (config.output_dir_path / LAST).exists()
        result = launch(config, resume=resume, progress=progress)
        backbone = DenseViT(config.model, checkpoint=result.backbone, **config.model_kwargs)
        backbones[name] = torch.no_grad()(backbone.eval())
    first = next(iter(configs.values()))
    size = settings["image_size"] or (
        first.image_size if settings["dataset"] == "synthetic" else 448
    )
    train_set, val_set = evaluation_splits(
        settings["dataset"],
        settings["data_root"],
        size,
        settings["train_images"],
        settings["val_images"],
    )
    results = evaluate(
        backbones,
        train_set,
        val_set,
        NUM_CLASSES[settings["dataset"]],
        settings["protocols"],
        output / "evaluation",
        ignore_index=IGNORE_INDEX,
        linear_epochs=settings["linear_epochs"],
        progress=progress,
        class_names=CLASS_NAMES.get(settings["dataset"]),
    )
    context = {
        "ablation": str(path),
        "overrides": " ".join(overrides or []) or None,
        "dataset": settings["dataset"],
        "image_size": size,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "linear_epochs": settings["linear_epochs"],
        "variants": {name: str(config.output_dir_path) for name, config in configs.items()},
    }
    markdown, data_file = write_results(results, output, context)
    markdown.rename(output / "ablation.md")
    data_file.rename(output / "ablation.json")
    plot(results, output / "ablation.png", title=path.stem)
    return results


def plot(results: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Grouped bars: one group per variant, one bar per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    width = 0.8 / max(1, len(metrics))
    figure, axis = plt.subplots(figsize=(1.4 + 1.1 * len(results), 3.6))
    for offset, metric in enumerate(metrics):
        values = [results[name].get(metric, 0.0) for name in results]
        positions = [i + (offset - (len(metrics) - 1) / 2) * width for i in range(len(results))]
        axis.bar(positions, values, width, label=metric)
    axis.set_xticks(range(len(results)), list(results), rotation=20)
    axis.set_ylabel("mIoU")
    axis.set_title(f"ablation: {title}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
