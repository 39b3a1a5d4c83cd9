"""Dense patch features from timm ViTs, the NeCo projection head, and the EMA teacher.

Needs timm (``pip install 'neco-loss[train]'``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neco_loss import backbones
from neco_loss.backbone_families import Recorder
from neco_loss.schedules import cosine
from neco_loss.weights import load_weights

DINOV2_REGISTERS = "vit_small_patch14_reg4_dinov2"  # reference configs: dinov2-reg ViT-S/14
HEAD_HIDDEN_DIM = 2048  # reference configs: projection_hidden_dim
HEAD_OUT_DIM = 256  # reference configs: projection_feat_dim
REFERENCE_MOMENTUM = 0.9995  # reference configs: momentum_teacher, EMA cosine from it to 1
# What the student is compared with (reference use_teacher): "ema", the EMA teacher (True);
# "student", a second student forward of the global views with gradient and drop-path, as the
# reference code runs use_teacher: False; "student_detached", the student's own global maps of
# the same forward, detached (ours: no second forward, no gradient through the references).


class DenseViT(nn.Module):
    """A ViT that returns patch maps ``(B, D, h, w)`` without CLS and register tokens.

    Any family of ``neco_loss.backbone_families``: timm ViTs (DINOv2, DINOv3, without a CLS
    token), HuggingFace transformers DINOv2 and DINOv3, torch.hub DINOv2 modules.

    Args:
        model: A timm model name (e.g. ``"vit_small_patch14_reg4_dinov2"``), ``hf:ID`` or a
            local transformers folder, ``hub:REPO:ENTRY``, or a model instance.
        pretrained: Load timm's pretrained weights (needs the HuggingFace hub, i.e. internet).
        checkpoint: A local weights file to load instead (``neco_loss.weights``: it must fit
            the model exactly).
        partial_weights: Load only the checkpoint's weights that fit (names and shapes), with
            one warning naming the rest.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate=0.1``, or
            ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` for a small ViT),
            or to the transformers config / the torch.hub entry.

    Examples:
        >>> vit = DenseViT("vit_small_patch14_reg4_dinov2", embed_dim=48, depth=1, num_heads=2)
        >>> vit(torch.randn(2, 3, 98, 126)).shape
        torch.Size([2, 48, 7, 9])

    """

    def __init__(
        self,
        model: str | nn.Module = DINOV2_REGISTERS,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        partial_weights: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            model = backbones.build(model, pretrained, **model_kwargs)
        family = backbones.family_of(model)  # TypeError listing the families for others
        family.prepare(model)
        self.family = family.name
        vit: Any = model  # a ViT of one of the families; their attributes are untyped
        self.vit = vit
        self.patch_size = family.patch_size(vit)
        self.embed_dim = family.embed_dim(vit)
        self.num_prefix_tokens = family.prefix_tokens(vit)
        if checkpoint is not None:
            load_weights(self.vit, checkpoint, partial=partial_weights)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B, D, H // patch, W // patch)`` patch tokens."""
        return vit_tokens_and_patch_map(self.vit, images)[1]


def vit_patch_size(vit: Any) -> int:
    """Side of a ViT's (square) patches (any family of ``neco_loss.backbone_families``)."""
    return backbones.patch_size(vit)


def vit_tokens_and_patch_map(vit: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """Run a ViT once: all its tokens and its patch tokens as a map.

    Args:
        vit: A ViT of a family of ``neco_loss.backbone_families`` (timm ones built with
            ``dynamic_img_size=True`` for sizes other than their ``img_size``).
        images: ``(B, 3, H, W)``, at least one patch on each side. Sides that are not
            multiples of the patch size lose their last ``H % patch`` rows and ``W % patch``
            columns, as the strided patch embedding of the reference code's ViTs ignores them
            (98 px at patch 16: 6x6 tokens over 96 px); give the loss the crop sizes
            (``NeCoLoss(patch_size=)``, ``forward(crop_sizes=)``) to keep boxes exact.

    Returns:
        ``tokens`` ``(B, T, D)``, final and normalised (prefix tokens first; for a timm ViT pool
        them with ``vit.forward_head(tokens, pre_logits=True)``) and the patch map
        ``(B, D, h, w)`` without the CLS and register tokens, ``h = H // patch``,
        ``w = W // patch``.

    Raises:
        ValueError: If ``images`` is not ``(B, 3, H, W)`` or smaller than one patch.

    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) but have shape {tuple(images.shape)}.")
    family = backbones.family_of(vit)
    patch_size = family.patch_size(vit)
    height, width = images.shape[2:]
    grid = (height // patch_size, width // patch_size)
    if min(grid) < 1:
        raise ValueError(f"image size {height}x{width} is smaller than one patch ({patch_size}).")
    images = images[..., : grid[0] * patch_size, : grid[1] * patch_size]
    tokens = family.tokens(vit, images)
    patches = tokens[:, family.prefix_tokens(vit) :]
    return tokens, patches.transpose(1, 2).unflatten(2, grid)


def cls_attention_recorder(vit: Any) -> Recorder:
    """The recorder of a ViT's CLS attention (``neco_loss.backbone_families.Family``).

    Raises:
        TypeError: If ``vit`` is of no supported family (the message lists them).
        ValueError: If it has no CLS token, naming what to use instead.

    """
    family = backbones.family_of(vit)
    if family.record_cls_attention is None or not family.has_cls_token(vit):
        raise ValueError(
            f"loss_mask foreground/background reads the CLS token's attention, but this "
            f"{family.name} model ({type(vit).__name__}) has no CLS token: use loss_mask: all "
            "(NeCo itself needs only the patch tokens), or a model with a CLS token."
        )
    return family.record_cls_attention


@contextmanager
def recording_cls_attention(vit: Any) -> Iterator[list[Tensor]]:
    """Record the CLS token's last-block attention to the patches in every forward of ``vit``.

    The reference code's ``loss_mask: fg/bg`` thresholds this attention
    (``forward_backbone(..., last_self_attention=True)``: ``attn[:, :, 0, 1:]``). Here it is the
    model's own attention (its family's recorder, ``neco_loss.backbone_families``: its q/k norms
    and rotary position encoding), taken over the patch tokens only, registers left out.

    Args:
        vit: A ViT of one of the families of ``neco_loss.backbone_families``, with a CLS token.

    Yields:
        A list that receives one ``(B, heads, h * w)`` float32 tensor per forward (patches in
        row-major order), without gradient.

    Raises:
        TypeError: If ``vit`` is not such a ViT.
        ValueError: If it has no CLS token (nothing to read a foreground from).

    """
    recorder = cls_attention_recorder(vit)
    records: list[Tensor] = []
    prefix = backbones.prefix_tokens(vit)
    stop = recorder(vit, lambda row: records.append(row[..., prefix:]))
    try:
        yield records
    finally:
        stop()


class ProjectionHead(nn.Module):
    """Per-token MLP ``D -> hidden -> hidden -> out`` with GELU, then L2 normalisation.

    Reference configs: ``projection_hidden_dim: 2048``, ``projection_feat_dim: 256``,
    ``n_layers_projection_head: 3``, trunc-normal(0.02) weights, zero biases.

    Args:
        in_dim: Feature size ``D`` of the backbone.
        hidden_dim: Hidden width.
        out_dim: Output size.

    """

    def __init__(
        self, in_dim: int, hidden_dim: int = HEAD_HIDDEN_DIM, out_dim: int = HEAD_OUT_DIM
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, feature_map: Tensor) -> Tensor:
        """``(B, D, h, w)`` -> ``(B, out_dim, h, w)`` with unit-norm tokens."""
        tokens = self.mlp(feature_map.permute(0, 2, 3, 1))
        return nn.functional.normalize(tokens, dim=-1).permute(0, 3, 1, 2)


class DenseEncoder(nn.Module):
    """Backbone + projection head: ``images -> (B, out_dim, h, w)`` unit-norm tokens."""

    def __init__(self, backbone: DenseViT, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, out_dim, h, w)``."""
        return self.head(self.backbone(images))


def momentum_at(
    step: int, total_steps: int, start: float = REFERENCE_MOMENTUM, end: float = 1.0
) -> float:
    """Cosine EMA momentum from ``start`` at step 0 to ``end`` at ``total_steps`` (reference)."""
    return cosine(step, total_steps, start, end)


class EMATeacher(nn.Module):
    """A frozen copy of a module, moved towards it by an exponential moving average.

    Unlike the reference code, the teacher never builds an autograd graph: its parameters do
    not require gradients, it runs under ``no_grad`` and stays in eval mode (no drop-path).
    ``update`` blends parameters and copies buffers.

    Args:
        student: The module to copy.
        copy_into: A freshly built module of the same architecture to load the student's state
            into, for modules that cannot be deep-copied (e.g. weight-normed layers); by default
            the student is deep-copied.

    """

    def __init__(self, student: nn.Module, copy_into: nn.Module | None = None) -> None:
        super().__init__()
        if copy_into is None:
            self.module = copy.deepcopy(student)
        else:
            copy_into.load_state_dict(student.state_dict())
            self.module = copy_into
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher stays in eval mode whatever the caller asks."""
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copied module's forward, without gradient."""
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student``; buffers copied.

        Raises:
            ValueError: If ``momentum`` is outside [0, 1].

        """
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] but is {momentum!r}.")
        teacher_parameters: list[Tensor] = list(self.module.parameters())
        student_parameters = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(teacher_parameters, student_parameters, 1 - momentum)
        for teacher_buffer, student_buffer in zip(
            self.module.buffers(), student.buffers(), strict=True
        ):
            teacher_buffer.copy_(student_buffer)
