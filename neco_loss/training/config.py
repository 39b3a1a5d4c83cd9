"""``TrainConfig``: every knob of ``neco train``; YAML keys = CLI flags = field names.

Defaults are the reference configuration for DINOv2-registers ViT-S/14
(``experiments/configs/models/small/neco_dinov2r.yml`` of the NeCo code), except
``crop sizes`` (224 / 98 here, 518 / 98 there) and the queue (off here, on there).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neco_loss import assets
from neco_loss.checks import check_choice, did_you_mean
from neco_loss.data import NeCoMultiCrop
from neco_loss.models import REFERENCE_MOMENTUM
from neco_loss.objectives import check_objective
from neco_loss.teacher_step import TEACHERS
from neco_loss.yaml_files import read_yaml

# Keys that only the built-in synthetic scenes read; a folder of images has its own.
SYNTHETIC_KEYS = ("image_size", "train_images")

# Numbers the optimiser and schedules multiply: a learning rate of 1e39 is inf in float32.
NON_NEGATIVE = ("lr_backbone", "lr_head", "final_lr", "weight_decay", "weight_decay_end")
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class TrainConfig:
    """Configuration of a NeCo post-pretraining run.

    Attributes:
        model: timm model name (reference: DINOv2 ViT-S/14 with 4 registers; DINOv3:
            ``vit_small_patch16_dinov3``), ``hf:ID`` (a HuggingFace transformers DINOv2 or
            DINOv3, e.g. ``hf:facebook/dinov2-small``), a local transformers folder
            (``config.json`` + weights, offline), or ``hub:REPO:ENTRY`` (torch.hub DINOv2); the
            families of ``neco_loss.backbone_families``. A transformers backbone is also saved
            as ``backbone_hf/``.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. a small ViT for CPU runs), or
            transformers config overrides.
        pretrained: Load timm's pretrained weights (needs internet on first use).
        weights: Local backbone weights to start from (overrides ``pretrained``), or the name
            of weights shipped in the package: ``testbed`` (``neco_loss.testbed``). They must
            fit the model exactly (``neco_loss.weights``).
        partial_weights: Load only the ``weights`` that fit the model (names and shapes) and
            warn once with the rest, instead of refusing a file that does not fit.
        drop_path_rate: Student stochastic depth (reference: 0.1).
        head_hidden_dim: Projection head width (reference: 2048).
        head_out_dim: Projection head output (reference: 256).
        dataset: ``"synthetic"`` (built-in ``SyntheticScenes``) or a folder of images.
        image_size: Side of the synthetic images.
        train_images: Number of synthetic training images (``None``: the dataset default).
        global_size: Global crop side (reference: 224 or 518).
        local_size: Local crop side (reference: 98).
        num_global: Global crops per image (reference: 2).
        num_local: Local crops per image (reference: 4).
        global_scale: Global crop area range (reference: (0.25, 1)).
        local_scale: Local crop area range (reference: (0.05, 0.25)).
        min_overlap: Minimum crop overlap as a fraction of the image (reference: 0.01).
        flip: Random horizontal flips (reference: off).
        jitter_strength: Colour jitter strength (reference: 1.0).
        blur_strength: Blur strength (reference: 1.0).
        loss: Keyword arguments of the objective's loss: for ``neco``, of ``NeCoLoss`` (e.g.
            ``{steepness: [10, 100], top_k: 5}``).
        objective: The dense loss of the step (``neco_loss.objectives.OBJECTIVES``): ``neco``
            (default), or an alternative on the same aligned pairs for a side-by-side run:
            ``paka`` (lightly's Patch Kernel Alignment), ``similarity_ce`` (NeCo without the
            sorting; ``loss: {temperature: 0.1}``) or ``continued`` (the testbed backbone's
            own VICReg(L); only for the testbed architecture).
        batch_size: Images per step (reference: 64).
        epochs: Passes over the data (reference: 25 on COCO).
        max_steps: Stop after this many steps (``None``: ``epochs`` decide).
        lr_backbone: Peak backbone learning rate (reference: 1e-5).
        lr_head: Peak head learning rate (reference: 1e-4).
        final_lr: Learning rate at the end of the cosine schedule (reference: 0).
        weight_decay: Weight decay at the start (reference: 0.04).
        weight_decay_end: Weight decay at the end, cosine (reference: 0.5).
        teacher: What the student is compared with: ``"ema"``, the EMA teacher (reference
            ``use_teacher: True``); ``"student"``, a second student forward of the global views
            with gradient and drop-path, as the reference code runs ``use_teacher: False``
            (``ablation_steepness_no_teacher.yml``); ``"student_detached"``, the student's own
            global maps of the same forward, detached (ours: no second forward, no gradient
            through the references).
        momentum: EMA momentum at the start (reference: 0.9995).
        momentum_end: EMA momentum at the end, cosine (reference: 1.0).
        grad_clip: Gradient norm clipping (``None``: off, reference).
        num_workers: Data loader worker processes.
        seed: Seed of everything (data order, augmentations, references, initialisation).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        devices: Processes to train on: one per GPU with CUDA, CPU processes otherwise;
            ``batch_size`` is per process (reference: per GPU).
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 on CPU), ``"bf16"`` or ``"fp32"``.
        output_dir: Where checkpoints, logs and the config go.
        checkpoint_every: Save a checkpoint every N steps (0: only at the end).
        log_every: Write a metrics row every N steps.

    """

    model: str = "vit_small_patch14_reg4_dinov2"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None
    partial_weights: bool = False
    drop_path_rate: float = 0.1
    head_hidden_dim: int = 2048
    head_out_dim: int = 256
    dataset: str = "synthetic"
    image_size: int = 96
    train_images: int | None = None
    global_size: int = 224
    local_size: int = 98
    num_global: int = 2
    num_local: int = 4
    global_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    min_overlap: float = 0.01
    flip: bool = False
    jitter_strength: float = 1.0
    blur_strength: float = 1.0
    loss: dict[str, Any] = field(default_factory=dict)
    objective: str = "neco"
    batch_size: int = 64
    epochs: int = 25
    max_steps: int | None = None
    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    final_lr: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.5
    teacher: str = "ema"
    momentum: float = REFERENCE_MOMENTUM
    momentum_end: float = 1.0
    grad_clip: float | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    devices: int = 1
    precision: str = "auto"
    output_dir: str = "outputs/train"
    checkpoint_every: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        _check_types(self)
        check_objective(self.objective, self.loss, self.model, self.model_kwargs)
        for name in (
            "batch_size",
            "epochs",
            "head_hidden_dim",
            "head_out_dim",
            "log_every",
            "devices",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 but is {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null but is {self.max_steps}.")
        _check_numbers(self)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]' but is {self.device!r}.")
        check_choice(self.teacher, "teacher", TEACHERS)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(
                f"precision must be 'auto', 'bf16' or 'fp32' but is {self.precision!r}."
            )
        if self.dataset != "synthetic" and not Path(self.dataset).expanduser().is_dir():
            raise FileNotFoundError(
                f"dataset must be 'synthetic' or an existing folder of images; {self.dataset} is "
                "neither."
            )
        if self.weights is not None and not assets.is_shipped(self.weights):
            if not Path(self.weights).expanduser().is_file():
                raise FileNotFoundError(
                    f"weights file {self.weights} does not exist (shipped weights: "
                    f"{sorted(assets.SHIPPED)})."
                )

    @property
    def output_dir_path(self) -> Path:
        """``output_dir`` with ``~`` expanded."""
        return Path(self.output_dir).expanduser()

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as YAML writes it."""
        return dataclasses.asdict(self)


def ignored_keys(config: TrainConfig) -> list[str]:
    """Keys set to other than their defaults that this config's dataset does not read."""
    if config.dataset == "synthetic":
        return []
    return [
        item.name
        for item in dataclasses.fields(TrainConfig)
        if item.name in SYNTHETIC_KEYS and getattr(config, item.name) != item.default
    ]


def multicrop_transform(config: TrainConfig) -> NeCoMultiCrop:
    """The multi-crop transform a config describes."""
    return NeCoMultiCrop(
        config.global_size,
        config.local_size,
        config.num_global,
        config.num_local,
        tuple(config.global_scale),
        tuple(config.local_scale),
        config.min_overlap,
        config.flip,
        jitter_strength=config.jitter_strength,
        blur_strength=config.blur_strength,
    )


def _check_numbers(config: TrainConfig) -> None:
    """Raise for numbers out of range, naming the key and its flag, when the config is read."""
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        numbers = value if isinstance(value, list) else [value]
        if hints[item.name] in (float, float | None, list[float]) and not all(
            math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in numbers if v is not None
        ):
            raise ValueError(
                f"config key {item.name!r} ({flag_name(item.name)}) must be finite and within "
                f"float32's range (|x| <= 3.4e38) but is {value!r}."
            )
    for name in NON_NEGATIVE + ("checkpoint_every", "num_workers"):
        _check_range(config, name, 0, math.inf)
    for name in ("momentum", "momentum_end"):
        _check_range(config, name, 0, 1)
    if config.grad_clip is not None and config.grad_clip <= 0:
        raise ValueError(f"grad_clip (--grad-clip) must be > 0 or null but is {config.grad_clip}.")
    try:
        multicrop_transform(config)
    except ValueError as error:
        raise ValueError(f"crops: {error}") from None


def _check_range(config: TrainConfig, name: str, low: float, high: float) -> None:
    value = getattr(config, name)
    if not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} ({flag_name(name)}) must be {bounds} but is {value}.")


def flag_name(key: str) -> str:
    """The command-line flag of a config key: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


def type_name(annotation: Any) -> str:
    """A type hint as users write it: ``int``, ``float | None``, ``list[float]``."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return "null" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _yaml_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _check_types(config: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if hints[item.name] in (float, float | None) and isinstance(value, str):
            value = _yaml_float(value)  # YAML 1.1 reads "1e-3" as a string
            setattr(config, item.name, value)
        if not _matches(value, hints[item.name]):
            raise TypeError(
                f"config key {item.name!r} ({flag_name(item.name)}) must be "
                f"{type_name(hints[item.name])} but is {type(value).__name__}: {value!r}."
            )
        if hints[item.name] is float or hints[item.name] == float | None:
            if isinstance(value, int):
                setattr(config, item.name, float(value))


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[key] = value``; ``a.b`` sets ``data["a"]["b"]`` (e.g. ``loss.top_k``)."""
    head, _, rest = key.partition(".")
    if rest:
        nested = data.setdefault(head, {})
        if not isinstance(nested, dict):
            raise ValueError(f"override {key!r}: {head!r} is not a mapping.")
        _apply(nested, rest, value)
    else:
        data[head] = value


def build_config(
    data: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """A ``TrainConfig`` from a mapping plus ``["--key", "value", ...]`` overrides.

    Values of overrides are parsed as YAML (``--epochs 3``, ``--loss.steepness "[10, 100]"``).

    Raises:
        ValueError: For unknown keys (the valid ones are listed) or malformed overrides.
        TypeError: For values of the wrong type.

    """
    data = dict(data or {})
    overrides = list(overrides or [])
    if len(overrides) % 2:
        raise ValueError(f"overrides must come as '--key value' pairs but got {overrides}.")
    for flag, text in zip(overrides[::2], overrides[1::2], strict=True):
        if not flag.startswith("--"):
            raise ValueError(f"override {flag!r} must start with '--'.")
        _apply(data, flag[2:].replace("-", "_"), read_yaml(text, flag))
    valid = [item.name for item in dataclasses.fields(TrainConfig)]
    for key in data:
        if key not in valid:
            raise ValueError(
                f"unknown config key {key!r}{did_you_mean(key, valid)}; every key with its "
                "type and default: neco train --help."
            )
    return TrainConfig(**data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (safe loader) and apply overrides; see ``build_config``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a YAML mapping, or for unknown keys.

    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    data = read_yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values.")
    return build_config(data, overrides)
