"""What a config builds before the first step.

The device, the backbone, the multi-view encoder, the optimizer's parameter groups, the
training images and the length of the schedule.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neco_loss.backbone_families import FAMILIES
from neco_loss.data import ImageFolder, SyntheticScenes
from neco_loss.models import (
    DenseEncoder,
    DenseViT,
    cls_attention_recorder,
    recording_cls_attention,
)
from neco_loss.training.config import TrainConfig, ignored_keys
from neco_loss.training.run_folder import SKIP_LOG


class MultiViewEncoder(nn.Module):
    """Encodes a list of views in one ``forward`` (what DistributedDataParallel needs).

    Views of one size go through the encoder together.

    Args:
        encoder: ``images (B, 3, s, s) -> maps (B, D, h, w)``.
        vit: The ViT inside ``encoder``, to record its CLS attention (``forward(...,
            attention=True)``).

    """

    def __init__(self, encoder: nn.Module, vit: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.vit = [vit]  # a list: not a submodule twice in state_dict and DDP

    def forward(
        self, views: list[Tensor], attention: bool = False
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """``V`` views ``(B, 3, s_v, s_v)`` -> ``V`` patch maps ``(B, D, h_v, w_v)``.

        With ``attention``, also each view's last-block CLS attention ``(B, heads, h_v, w_v)``
        (``neco_loss.models.recording_cls_attention``), else ``None``: a
        ``neco_loss.teacher_step.Encoder``.
        """
        maps: dict[int, Tensor] = {}
        attentions: dict[int, Tensor] = {}
        sizes: dict[tuple[int, ...], list[int]] = {}
        for index, view in enumerate(views):
            sizes.setdefault(tuple(view.shape), []).append(index)
        for indices in sizes.values():
            with contextlib.ExitStack() as stack:
                records = (
                    stack.enter_context(recording_cls_attention(self.vit[0])) if attention else []
                )
                encoded = self.encoder(torch.cat([views[i] for i in indices]))
            maps.update(zip(indices, encoded.chunk(len(indices)), strict=True))
            if attention:  # one record per encoder call: this size's views, in order
                grids = records[0].unflatten(-1, encoded.shape[2:]).chunk(len(indices))
                attentions.update(zip(indices, grids, strict=True))
        in_order = [maps[index] for index in range(len(views))]
        if not attention:
            return in_order, None
        return in_order, [attentions[index] for index in range(len(views))]


def build_backbone(config: TrainConfig) -> DenseViT:
    """The student backbone of a config (seeded initialisation).

    Warns once when a timm model starts from random weights (no ``weights``, ``pretrained:
    false``): NeCo post-pretrains a backbone; from random weights it has nothing to refine.
    """
    torch.manual_seed(config.seed)
    backbone = DenseViT(
        config.model,
        pretrained=config.pretrained and config.weights is None,
        checkpoint=config.weights,
        partial_weights=config.partial_weights,
        drop_path_rate=config.drop_path_rate,
        **config.model_kwargs,
    )
    random = FAMILIES[backbone.family].starts_random and not config.pretrained
    if random and config.weights is None:
        warnings.warn(
            f"model {config.model} starts from random weights (pretrained: false, no weights): "
            "NeCo post-pretrains a trained backbone (pretrained: true, or weights: FILE).",
            stacklevel=2,
        )
    return backbone


def training_images(config: TrainConfig) -> Any:
    """The training dataset of a config; a folder lists unreadable files in ``SKIP_LOG``."""
    if config.dataset == "synthetic":
        return SyntheticScenes(
            "train", size=config.image_size, length=config.train_images, seed=config.seed
        )
    return ImageFolder(config.dataset, skip_log=config.output_dir_path / SKIP_LOG)


def training_device(config: TrainConfig, rank: int = 0) -> torch.device:
    """The process's device: with several processes on CUDA, GPU ``rank`` of this machine."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for, but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False): use --device cpu, or auto."
        )
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(name)


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def parameter_groups(
    student: DenseEncoder, config: TrainConfig, objective: nn.Module | None = None
) -> list[dict[str, Any]]:
    """Backbone / head x decay / no decay groups.

    Biases and norms are not decayed (reference ``exclude_norm_bias: True``). An objective's
    own parameters (``continued``'s expanders) train as the head does, at ``lr_head``.
    """
    groups = []
    parts = [(student.backbone, config.lr_backbone), (student.head, config.lr_head)]
    if objective is not None:
        parts.append((objective, config.lr_head))
    for part, lr in parts:
        decay = [p for p in part.parameters() if p.requires_grad and p.ndim > 1]
        other = [p for p in part.parameters() if p.requires_grad and p.ndim <= 1]
        groups.append({"params": decay, "peak_lr": lr, "decay": True})
        groups.append({"params": other, "peak_lr": lr, "decay": False})
    return [group for group in groups if group["params"]]


def check_backbone(config: TrainConfig, backbone: DenseViT) -> None:
    """Raise if the model cannot run the config, naming the key.

    Raises:
        ValueError: A crop smaller than one patch (``local_size (--local-size) is 6 px,
            smaller than one patch ...``), or a ``loss_mask`` for a model without a CLS token.

    """
    for name in ("global_size", "local_size"):
        if getattr(config, name) < backbone.patch_size:
            raise ValueError(
                f"{name} (--{name.replace('_', '-')}) is {getattr(config, name)} px, smaller "
                f"than one patch of the model ({backbone.patch_size} px): a crop must hold at "
                "least one patch (reference: 224 and 98 at patch 14)."
            )
    if config.loss.get("loss_mask", "all") != "all":
        cls_attention_recorder(backbone.vit)  # refused without a CLS token


def schedule_length(config: TrainConfig, steps_per_epoch: int, announce: bool = True) -> int:
    """The run's total steps: ``max_steps``, capped by ``epochs`` passes over the data.

    With ``announce``, one warning when the cap cuts ``max_steps``, and one when the config
    sets keys its dataset does not read (``image_size``/``train_images`` with a folder).
    """
    epochs_steps = config.epochs * steps_per_epoch
    ignored = ignored_keys(config)
    if announce and ignored:
        warnings.warn(
            f"{' and '.join(ignored)} (for the built-in synthetic scenes "
            f"only) ignored: every image below {config.dataset} is used, at its own size.",
            UserWarning,
            stacklevel=3,
        )
    if announce and config.max_steps is not None and config.max_steps > epochs_steps:
        warnings.warn(
            f"max_steps {config.max_steps} is more than epochs x steps per epoch = "
            f"{config.epochs} x {steps_per_epoch} = {epochs_steps}: the run stops "
            f"after {epochs_steps} steps (raise --epochs to train {config.max_steps}).",
            UserWarning,
            stacklevel=3,
        )
    return min(config.max_steps or epochs_steps, epochs_steps)
