"""DINOv2-with-registers backbones for solo-learn's backbone table.

solo-learn calls a backbone constructor as ``constructor(method, **cfg.backbone.kwargs)`` and
needs ``num_features`` on the result; a timm ViT built with ``num_classes=0`` returns its
pooled (CLS) feature from ``forward``, as solo-learn's own ViTs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from neco_loss.models import DINOV2_REGISTERS
from neco_loss.weights import load_weights

BackboneConstructor = Callable[..., nn.Module]


def dinov2_backbone(timm_name: str) -> BackboneConstructor:
    """A solo-learn backbone constructor for the timm model ``timm_name``.

    The constructor takes ``pretrained`` (default ``True``: timm's weights from the HuggingFace
    hub, needs internet), ``checkpoint_path`` (a local weights file instead, see
    ``neco_loss.weights.load_state_dict``) and any ``timm.create_model`` keyword (e.g.
    ``drop_path_rate``, or ``embed_dim``/``depth``/``num_heads`` with ``pretrained: false`` for
    a small test model). Models accept any input size divisible by the patch size
    (``dynamic_img_size=True``): 518 px global and 98 px local crops as the reference.
    """

    def build(
        method: str,
        pretrained: bool = True,
        checkpoint_path: str | Path | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        import timm

        download = pretrained and checkpoint_path is None
        try:
            model = timm.create_model(
                timm_name, pretrained=download, dynamic_img_size=True, num_classes=0, **kwargs
            )
        except OSError as error:  # the hub is unreachable and nothing is cached
            raise RuntimeError(
                f"could not download the pretrained {timm_name} weights ({error}). Offline, set "
                "backbone.kwargs.checkpoint_path to a local weights file, or "
                "backbone.kwargs.pretrained: false for random weights."
            ) from error
        if checkpoint_path is not None:
            load_weights(model, checkpoint_path)
        return model

    build.__name__ = timm_name
    return build


# solo-learn backbone names -> constructors (reference: DINOv2-reg ViT-S/14 and ViT-B/14).
BACKBONES: dict[str, BackboneConstructor] = {
    "dinov2_vits14_reg": dinov2_backbone(DINOV2_REGISTERS),
    "dinov2_vitb14_reg": dinov2_backbone("vit_base_patch14_reg4_dinov2"),
}
