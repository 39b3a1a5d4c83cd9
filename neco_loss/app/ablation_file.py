"""Ablation files: a base configuration, its variants as overrides, and how to score them.

An ablation file names a base configuration and the variants as overrides of it::

    base: ../recipes/tiny_cpu.yaml        # relative to the ablation file
    variants:
      CE: {}
      L1: {loss: {loss: l1}}
    evaluation: {train_images: 200, val_images: 128, linear_epochs: 20}

Optional keys: ``seeds``, ``baseline`` (also score the starting backbone), ``x`` (the number
the variants vary, for a line plot) and ``reference`` (a variant the others are compared with).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from neco_loss.evaluation.linear import EPOCHS
from neco_loss.yaml_files import read_yaml

EVALUATION_DEFAULTS: dict[str, Any] = {
    "dataset": "synthetic",
    "data_root": None,
    "image_size": None,
    "train_images": 200,
    "val_images": 128,
    "split": "val",  # the split scored; SyntheticScenes also has "test"
    "linear_epochs": EPOCHS,
    "protocols": ["in-context", "linear"],
}
ABLATION_KEYS = ("base", "variants", "evaluation", "seeds", "baseline", "x", "reference")


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; nested mappings are merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class Ablation:
    """A parsed ablation file.

    Attributes:
        base: The base configuration (``TrainConfig`` keys).
        variants: ``{name: overrides of base}``.
        evaluation: Evaluation settings (``EVALUATION_DEFAULTS`` keys).
        seeds: Seeds every variant is trained with; ``None``: the configuration's seed.
        baseline: Also score the base's starting backbone (its ``weights``) as a row.
        x_label: Name of the numeric setting the variants vary, for a line plot.
        x_values: ``{variant: value of that setting}``.
        reference: A variant every other one is compared with, seed by seed.

    """

    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    evaluation: dict[str, Any]
    seeds: list[int] | None = None
    baseline: bool = False
    x_label: str | None = None
    x_values: dict[str, float] = field(default_factory=dict)
    reference: str | None = None


def check_seeds(seeds: Any, source: str) -> list[int]:
    """``seeds`` if it is a non-empty list of distinct ints.

    Raises:
        ValueError: Naming ``source`` (the key or flag) and the value seen.

    """
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"{source} must be a non-empty list of distinct ints but is {seeds!r}.")
    return seeds


def _check_x(spec: Any, variants: dict[str, Any], path: Path) -> tuple[str, dict[str, float]]:
    if not isinstance(spec, dict) or set(spec) != {"label", "values"}:
        raise ValueError(f"'x' of {path} must be {{label: ..., values: {{variant: number}}}}.")
    values = spec["values"]
    if not isinstance(values, dict) or set(values) != set(variants):
        raise ValueError(
            f"'x.values' of {path} must give a number for every variant {list(variants)} but "
            f"covers {list(values) if isinstance(values, dict) else values!r}."
        )
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"'x.values.{name}' of {path} must be a number but is {value!r}.")
    return str(spec["label"]), {name: float(value) for name, value in values.items()}


def load_ablation(path: Path) -> Ablation:
    """Parse and check an ablation file.

    Keys: ``base`` and ``variants``; optional ``evaluation``, ``seeds``, ``baseline``, ``x``,
    ``reference``.

    Raises:
        FileNotFoundError: If the file or its base config does not exist.
        ValueError: If it lacks ``base`` or ``variants``, has unknown keys, or a key has the
            wrong form.

    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ablation file {path} does not exist.")
    spec = read_yaml(path.read_text(), f"ablation file {path}") or {}
    unknown = sorted(set(spec) - set(ABLATION_KEYS))
    if unknown or "base" not in spec or not spec.get("variants"):
        raise ValueError(
            f"ablation file {path} needs 'base' and 'variants' (and may have "
            f"{list(ABLATION_KEYS[2:])}); unknown keys: {unknown}."
        )
    base = spec["base"]
    if isinstance(base, str):
        base_path = (path.parent / base).expanduser()
        if not base_path.is_file():
            raise FileNotFoundError(f"base config {base_path} of {path} does not exist.")
        base = read_yaml(base_path.read_text(), f"base config {base_path}") or {}
    evaluation = merge(EVALUATION_DEFAULTS, spec.get("evaluation") or {})
    unknown = sorted(set(evaluation) - set(EVALUATION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown evaluation keys {unknown}; valid: {list(EVALUATION_DEFAULTS)}.")
    if evaluation["split"] not in ("val", "test"):
        # Training images are never scored: an unknown name must not fall back to them.
        raise ValueError(
            f"'evaluation.split' of {path} must be 'val' or 'test' but is {evaluation['split']!r}."
        )
    variants = {
        _variant_name(name, path): changes or {} for name, changes in spec["variants"].items()
    }
    ablation = Ablation(base, variants, evaluation)
    if "seeds" in spec:
        ablation.seeds = check_seeds(spec["seeds"], f"'seeds' of {path}")
    if "baseline" in spec:
        if not isinstance(spec["baseline"], bool):
            raise ValueError(f"'baseline' of {path} must be true or false.")
        ablation.baseline = spec["baseline"]
    if "x" in spec:
        ablation.x_label, ablation.x_values = _check_x(spec["x"], variants, path)
    if "reference" in spec:
        if spec["reference"] not in variants:
            raise ValueError(
                f"'reference' of {path} must name a variant ({list(variants)}) but is "
                f"{spec['reference']!r}."
            )
        ablation.reference = spec["reference"]
    return ablation


def _variant_name(name: Any, path: Path) -> str:
    """A variant's name if it stays inside the output folder (it names ``OUTPUT/<name>``).

    ``100/1000`` (a sub-folder) is fine; an absolute path, ``..`` or an empty name are not.

    Raises:
        ValueError: Naming the variant and the file.

    """
    parts = PurePosixPath(str(name)).parts
    if not isinstance(name, str) or not parts or parts[0] == "/" or ".." in parts:
        raise ValueError(
            f"variant name {name!r} of {path} must be a relative name without '..': each "
            "variant trains into OUTPUT/<name>, inside the ablation's output folder."
        )
    return name
