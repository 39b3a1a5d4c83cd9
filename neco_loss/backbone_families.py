"""The ViT families NeCo trains, registered in ``FAMILIES``: how each is run and inspected.

A family turns images into all final tokens (prefix tokens first, then the patch grid), counts
its prefix tokens, says whether it has a CLS token, records the CLS token's last-block
attention as the model itself computes it (for ``neco_loss.models.recording_cls_attention``),
and saves a trained model in its own format:

- ``timm``: timm ``VisionTransformer`` (DINOv2, with or without registers; also without a CLS
  token, ``class_token=False``); saved as a timm state dict.
- ``timm-rope``: timm ``Eva`` models with rotary position encoding, e.g. DINOv3
  (``vit_small_patch16_dinov3``: 4 registers, patch 16) and EVA-02; a timm state dict.
- ``transformers-dinov2``: HuggingFace ``Dinov2Model`` and ``Dinov2WithRegistersModel``
  (``pip install 'neco-loss[hf]'``), from a hub id (``hf:facebook/dinov2-small``) or a local
  ``save_pretrained`` folder (offline); saved with ``save_pretrained``.
- ``transformers-dinov3``: HuggingFace ``DINOv3ViTModel``
  (``hf:facebook/dinov3-vits16-pretrain-lvd1689m`` or a folder); saved with
  ``save_pretrained``. Its train-mode augmentation of the RoPE patch coordinates is switched
  off (``prepare``): the student (train mode) and the teacher (eval mode) must see one
  position encoding for one crop, as timm's DINOv3 does anyway.
- ``torch.hub``: the official DINOv2 modules (``torch.hub.load("facebookresearch/dinov2",
  "dinov2_vits14_reg")``: ``forward_features`` returning ``x_norm_patchtokens``); saved as their
  state dict, which ``load_state_dict`` of the hub module takes back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HF_FOLDER = "backbone_hf"  # save_pretrained folder of a transformers backbone in a run's output

# Starts passing the CLS token's last-block attention of every forward of a model to a callback
# (one (B, heads, T) float32 tensor without gradient per forward, over all T tokens); returns
# the function that stops it.
Recorder = Callable[[Any, Callable[[Tensor], None]], Callable[[], None]]


@dataclass(frozen=True)
class Family:
    """How NeCo runs one family of ViTs.

    Attributes:
        name: The family's name (``FAMILIES`` key).
        named_as: What a user names to get one, for messages.
        recognises: Whether a built model belongs to the family.
        tokens: ``(model, images (B, 3, H, W)) -> (B, T, D)`` final normalised tokens.
        prefix_tokens: The CLS and register tokens before the patches.
        has_cls_token: Whether the first token is a CLS token.
        patch_size: Side of the square patches.
        embed_dim: Token width ``D``.
        record_cls_attention: See ``Recorder``; ``None`` for a family that never has a CLS
            token.
        starts_random: Built by name, a model of the family has random weights unless its
            pretrained ones are asked for (timm); the others always load theirs.
        prepare: Called once on a model before training (in place).
        save: Saves a trained model in its own format into a run folder; returns the path, or
            ``None`` when the trainer's state dict is that format.

    """

    name: str
    named_as: str
    recognises: Callable[[Any], bool]
    tokens: Callable[[Any, Tensor], Tensor]
    prefix_tokens: Callable[[Any], int]
    has_cls_token: Callable[[Any], bool]
    patch_size: Callable[[Any], int]
    embed_dim: Callable[[Any], int]
    record_cls_attention: Recorder | None
    starts_random: bool = False
    prepare: Callable[[Any], None] = lambda model: None
    save: Callable[[Any, Path], Path | None] = lambda model, folder: None


def _side(patch: Any) -> int:
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _is_timm(model: Any) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens")


def _is_timm_rope(model: Any) -> bool:
    try:
        from timm.models.eva import Eva
    except ImportError:  # no timm: no timm model either
        return False
    return isinstance(model, Eva)


def _model_type(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if hasattr(model, "save_pretrained") else None


def _record_timm(model: Any, receive: Callable[[Tensor], None]) -> Callable[[], None]:
    """timm: the last block's own attention matrix.

    Its explicit (not fused) path passes the softmaxed matrix, after the q/k norms and the
    RoPE, through ``attn_drop``, where a hook reads it.
    """
    attention = model.blocks[-1].attn
    fused = attention.fused_attn

    def record(module: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        receive(inputs[0][:, :, 0].detach().float())

    attention.fused_attn = False
    handle = attention.attn_drop.register_forward_hook(record)

    def stop() -> None:
        handle.remove()
        attention.fused_attn = fused

    return stop


def _record_transformers(model: Any, receive: Callable[[Tensor], None]) -> Callable[[], None]:
    """transformers: the last layer's attention weights, as ``output_attentions`` gives them.

    The eager implementation, the only one that forms them, runs while recording.
    """
    layers = model.model.layer if _model_type(model) in DINOV3_TYPES else model.encoder.layer
    implementation = model.config._attn_implementation

    def record(module: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        receive(output[1][:, :, 0].detach().float())

    model.config._attn_implementation = "eager"
    handle = layers[-1].attention.register_forward_hook(record)

    def stop() -> None:
        handle.remove()
        model.config._attn_implementation = implementation

    return stop


def _record_hub(model: Any, receive: Callable[[Tensor], None]) -> Callable[[], None]:
    """torch.hub DINOv2: recomputed from the last block's normalised input and its ``qkv``.

    The hub modules may run xformers, which never forms the matrix; they have no RoPE.
    """
    attention = model.blocks[-1].attn
    heads, width = int(attention.num_heads), attention.qkv.out_features // 3

    def record(module: Any, inputs: tuple[Tensor, ...]) -> None:
        with torch.no_grad():
            tokens = inputs[0]  # (B, T, C) after the block's first norm
            batch, count, _ = tokens.shape
            qkv = attention.qkv(tokens).reshape(batch, count, 3, heads, width // heads)
            query, key = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
            weights = (query * attention.scale @ key.transpose(-2, -1)).softmax(dim=-1)
            receive(weights[:, :, 0].float())

    handle = attention.register_forward_pre_hook(record)
    return handle.remove


def _hub_tokens(model: Any, images: Tensor) -> Tensor:
    out = model.forward_features(images)
    parts = [out["x_norm_clstoken"][:, None]]
    if out.get("x_norm_regtokens") is not None:
        parts.append(out["x_norm_regtokens"])
    return torch.cat([*parts, out["x_norm_patchtokens"]], dim=1)


def _without_rope_augmentation(model: Any) -> None:
    """Switch off the train-mode augmentation of a transformers DINOv3's RoPE coordinates.

    It shifts, jitters and rescales the patch coordinates at random in train mode
    (``pos_embed_rescale`` 2 by default): the student would see another position encoding
    than the teacher for the same crop. Its RoPE module gets a config without them; the
    model's own config, which ``save_pretrained`` writes, keeps them.
    """
    rope = model.rope_embeddings
    rope.config = copy.copy(rope.config)
    rope.config.pos_embed_shift = rope.config.pos_embed_jitter = None
    rope.config.pos_embed_rescale = None


def _save_pretrained(model: Any, output_dir: Path) -> Path:
    folder = output_dir / HF_FOLDER
    model.save_pretrained(folder)
    return folder


def _transformers_tokens(model: Any, images: Tensor) -> Tensor:
    return model(pixel_values=images).last_hidden_state


def _transformers_prefix(model: Any) -> int:
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def _timm_family(name: str, named_as: str, recognises: Callable[[Any], bool]) -> Family:
    return Family(
        name,
        named_as,
        recognises,
        tokens=lambda model, images: model.forward_features(images),
        prefix_tokens=lambda model: int(model.num_prefix_tokens),
        has_cls_token=lambda model: getattr(model, "cls_token", None) is not None,
        patch_size=lambda model: _side(model.patch_embed.patch_size),
        embed_dim=lambda model: int(model.embed_dim),
        record_cls_attention=_record_timm,
        starts_random=True,
    )


DINOV2_TYPES = ("dinov2", "dinov2_with_registers")  # transformers config model_type
DINOV3_TYPES = ("dinov3_vit",)
TRANSFORMERS_TYPES = DINOV2_TYPES + DINOV3_TYPES


def _transformers_family(name: str, named_as: str, model_types: tuple[str, ...]) -> Family:
    return Family(
        name,
        named_as,
        lambda model: _model_type(model) in model_types,
        tokens=_transformers_tokens,
        prefix_tokens=_transformers_prefix,
        has_cls_token=lambda model: True,
        patch_size=lambda model: _side(model.config.patch_size),
        embed_dim=lambda model: int(model.config.hidden_size),
        record_cls_attention=_record_transformers,
        prepare=_without_rope_augmentation if model_types == DINOV3_TYPES else lambda model: None,
        save=_save_pretrained,
    )


# timm modules whose ViTs the timm families cover (for suggestions; others may fit too).
TIMM_MODULES = ("vision_transformer", "eva")


# In the order they are tried: timm-rope before timm (an Eva also has timm's attributes).
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        _timm_family(
            "timm-rope", "a timm Eva name, e.g. vit_small_patch16_dinov3 (DINOv3)", _is_timm_rope
        ),
        _timm_family(
            "timm",
            "a timm ViT name, e.g. vit_small_patch14_reg4_dinov2 (class_token=False too)",
            lambda model: _is_timm(model) and not _is_timm_rope(model),
        ),
        _transformers_family(
            "transformers-dinov2",
            "hf:facebook/dinov2-small or a save_pretrained folder of Dinov2(WithRegisters)Model",
            DINOV2_TYPES,
        ),
        _transformers_family(
            "transformers-dinov3",
            "hf:facebook/dinov3-vits16-pretrain-lvd1689m or a folder of DINOv3ViTModel",
            DINOV3_TYPES,
        ),
        Family(
            "torch.hub",
            "hub:facebookresearch/dinov2:dinov2_vits14_reg (a DinoVisionTransformer instance)",
            lambda model: (
                hasattr(model, "forward_features") and hasattr(model, "num_register_tokens")
            ),
            tokens=_hub_tokens,
            prefix_tokens=lambda model: 1 + int(model.num_register_tokens or 0),
            has_cls_token=lambda model: True,
            patch_size=lambda model: _side(model.patch_size),
            embed_dim=lambda model: int(model.embed_dim),
            record_cls_attention=_record_hub,
        ),
    )
}


def supported_families() -> str:
    """One line: every family and how to name one."""
    return "; ".join(f"{family.name}: {family.named_as}" for family in FAMILIES.values())


def family_of(model: Any) -> Family:
    """The registered family of a built model.

    Raises:
        TypeError: For any other module, listing the supported families.

    """
    for family in FAMILIES.values():
        if family.recognises(model):
            return family
    raise TypeError(
        f"model must be a ViT of a supported family but is {type(model).__name__}. "
        f"Supported: {supported_families()}."
    )
