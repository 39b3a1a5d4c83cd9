"""The shipped recipes equal the authors' configurations, key by key.

The official values are written here, each table citing its file in github.com/vpariza/NeCo
(``experiments/configs/...``, read at commit 3932160); ``n_layers_projection_head: 3``,
``exclude_norm_bias: True`` and ``optimizer: adamw`` are fixed in this package, the student's
``drop_path_rate=0.1`` is set in the official ``NeCo.init_model``, and ``is_queue_usable``
defaults to False in ``experiments/train_with_neco.py`` when a config leaves it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import yaml

from neco_loss.loss import NeCoLoss
from neco_loss.training import build_config
from neco_loss.training.config import TrainConfig

RECIPES = Path(__file__).parents[1] / "examples" / "recipes"

COMMON = {
    "nmb_samples": [2, 4],
    "min_scale_crops": [0.25, 0.05],
    "max_scale_crops": [1.0, 0.25],
    "min_intersection_crops": 0.01,
    "jitter_strength": 1.0,
    "blur_strength": 1.0,
    "use_teacher": True,
    "roi_align_kernel_size": 7,
    "momentum_teacher": 0.9995,
    "momentum_teacher_end": 1.0,
    "projection_feat_dim": 256,
    "projection_hidden_dim": 2048,
    "loss_mask": "all",
    "final_lr": 0.0,
    "weight_decay": 0.04,
    "weight_decay_end": 0.5,
    "student_steepness": 100.0,
    "teacher_steepness": 100.0,
    "grad_norm_clipping": None,
    "sort_net": "bitonic",
    "sim_dist": "cosine",
    "drop_path_rate": 0.1,
}

OFFICIAL: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov2_vits14_reg_coco.yaml": (
        "experiments/configs/models/small/neco_dinov2r.yml",
        {
            **COMMON,
            "pretrained_weights": "dinov2-reg",
            "arch": "vit-small",
            "patch_size": 14,
            "num_register_tokens": 4,
            "size_crops": [518, 98],
            "batch_size": 64,
            "max_epochs": 25,
            "lr_backbone": 1e-5,
            "lr_heads": 1e-4,
            "is_queue_usable": True,
            "queue_length": 8192,
        },
    ),
    "dinov2_vitb14_reg_coco.yaml": (
        "experiments/configs/models/base/neco_dinov2r.yml",
        {
            **COMMON,
            "pretrained_weights": "dinov2-reg",
            "arch": "vit-base",
            "patch_size": 14,
            "num_register_tokens": 4,
            "size_crops": [518, 98],
            "batch_size": 16,
            "max_epochs": 25,
            "lr_backbone": 1e-6,
            "lr_heads": 1e-4,
            "is_queue_usable": True,
            "queue_length": 8192,
        },
    ),
    "dino_vits16_coco.yaml": (
        "experiments/configs/models/small/neco_dino.yml",
        {
            **COMMON,
            "pretrained_weights": "dino",
            "arch": "vit-small",
            "patch_size": 16,
            "num_register_tokens": 0,
            "size_crops": [224, 98],
            "batch_size": 45,
            "max_epochs": 50,
            "lr_backbone": 1e-5,
            "lr_heads": 1e-4,
            "is_queue_usable": False,  # queue_length: 8192 is set but the queue is off
        },
    ),
}
WEIGHTS = {"dinov2-reg": ".lvd142m", "dino": ".dino"}  # timm pretrained tags
ARCH = {"vit-small": 384, "vit-base": 768}  # embed_dim
LOSS_MASKS = {"all": "all", "foreground": "fg", "background": "bg"}


def official_view(config: TrainConfig) -> dict[str, Any]:
    """A recipe as the official configuration keys would state it."""
    criterion = NeCoLoss(**config.loss)
    vit = timm.create_model(config.model, pretrained=False, num_classes=0)
    patch = vit.patch_embed.patch_size
    view = {
        "pretrained_weights": next(
            (name for name, tag in WEIGHTS.items() if config.model.endswith(tag)), None
        ),
        "arch": {dim: arch for arch, dim in ARCH.items()}.get(vit.embed_dim),
        "patch_size": patch[0] if isinstance(patch, tuple) else patch,
        "num_register_tokens": vit.num_prefix_tokens - 1,
        "size_crops": [config.global_size, config.local_size],
        "nmb_samples": [config.num_global, config.num_local],
        "min_scale_crops": [config.global_scale[0], config.local_scale[0]],
        "max_scale_crops": [config.global_scale[1], config.local_scale[1]],
        "min_intersection_crops": config.min_overlap,
        "jitter_strength": config.jitter_strength,
        "blur_strength": config.blur_strength,
        "use_teacher": config.teacher == "ema",
        "roi_align_kernel_size": criterion.roi_size,
        "momentum_teacher": config.momentum,
        "momentum_teacher_end": config.momentum_end,
        "projection_feat_dim": config.head_out_dim,
        "projection_hidden_dim": config.head_hidden_dim,
        "loss_mask": LOSS_MASKS[criterion.loss_mask],
        "batch_size": config.batch_size,
        "max_epochs": config.epochs,
        "lr_backbone": config.lr_backbone,
        "lr_heads": config.lr_head,
        "final_lr": config.final_lr,
        "weight_decay": config.weight_decay,
        "weight_decay_end": config.weight_decay_end,
        "student_steepness": criterion.options.steepnesses[0],
        "teacher_steepness": criterion.options.steepnesses[1],
        "grad_norm_clipping": config.grad_clip,
        "sort_net": criterion.options.network,
        "sim_dist": criterion.similarity,
        "drop_path_rate": config.drop_path_rate,
        "is_queue_usable": criterion.queue is not None,
    }
    if criterion.queue is not None:
        view["queue_length"] = criterion.queue.length
    return view


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_recipe_equals_the_official_config(recipe):
    source, official = OFFICIAL[recipe]
    values = yaml.safe_load((RECIPES / recipe).read_text())
    config = build_config({**values, "dataset": "synthetic", "pretrained": False})
    ours = official_view(config)
    differences = {
        key: (ours.get(key), expected)
        for key, expected in official.items()
        if ours.get(key) != expected
    }
    assert not differences, f"{recipe} differs from {source}: (ours, official) {differences}"


def test_the_comparison_can_fail():
    """A recipe with the queue on where the official config has it off is caught."""
    values = yaml.safe_load((RECIPES / "dino_vits16_coco.yaml").read_text())
    values["loss"] = {"roi_size": 7, "references": "queue", "queue_length": 8192}
    config = build_config({**values, "dataset": "synthetic"})
    assert (
        official_view(config)["is_queue_usable"]
        != OFFICIAL["dino_vits16_coco.yaml"][1]["is_queue_usable"]
    )
