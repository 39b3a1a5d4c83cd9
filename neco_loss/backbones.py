"""The ViT families NeCo trains: how to build, run, inspect and save each, behind one protocol.

A family turns images into ``(tokens, patch map)`` (prefix tokens first, then the patch grid),
names the module whose input feeds the last block's attention (for
``neco_loss.models.recording_cls_attention``), and saves a trained model in its own format:

- ``timm``: timm ``VisionTransformer`` (``forward_features``, ``num_prefix_tokens``); saved as
  a timm state dict.
- ``transformers``: HuggingFace ``Dinov2Model`` and ``Dinov2WithRegistersModel``
  (``pip install transformers``); built from a hub id (``hf:facebook/dinov2-small``) or a
  local ``save_pretrained`` folder (``config.json`` + weights, offline), saved with
  ``save_pretrained``.
- ``torch.hub``: the official DINOv2 modules (``torch.hub.load("facebookresearch/dinov2",
  "dinov2_vits14_reg")``: ``forward_features`` returning ``x_norm_patchtokens``); saved as their
  state dict, which ``load_state_dict`` of the hub module takes back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

HF_PREFIX = "hf:"  # model names that HuggingFace transformers builds
HUB_PREFIX = "hub:"  # "hub:REPO:ENTRY", e.g. hub:facebookresearch/dinov2:dinov2_vits14_reg
HF_FOLDER = "backbone_hf"  # save_pretrained folder of a transformers backbone in a run's output
# "1" allows models that run code of theirs (a torch.hub repo's hubconf.py, a transformers
# folder's Python files). `neco --trust-remote-code` sets it for one command; the CLI clears it
# otherwise, so that no config file, run folder or shell profile can allow it.
TRUST_REMOTE_CODE = "NECO_TRUST_REMOTE_CODE"


@dataclass(frozen=True)
class AttentionInput:
    """How to get the CLS token's attention from the last block's attention input.

    Attributes:
        module: Receives the normalised tokens ``(B, T, C)`` as its first input.
        query: ``(B, T, C) -> (B, T, heads * d)``.
        key: Same for keys.
        heads: Number of heads.
        scale: Multiplier of ``q . k``.
        query_norm: Applied to ``(B, heads, T, d)`` queries (timm's ``q_norm``; identity else).
        key_norm: Same for keys.

    """

    module: nn.Module
    query: Any
    key: Any
    heads: int
    scale: float
    query_norm: Any = None
    key_norm: Any = None


def family(model: nn.Module) -> str:
    """``"timm"``, ``"transformers"`` or ``"torch.hub"``.

    Raises:
        TypeError: For any other module.

    """
    if hasattr(model, "config") and hasattr(getattr(model, "encoder", None), "layer"):
        return "transformers"
    if hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens"):
        return "timm"
    if hasattr(model, "forward_features") and hasattr(model, "num_register_tokens"):
        return "torch.hub"
    raise TypeError(
        f"model must be a timm ViT, a transformers Dinov2Model or a torch.hub DINOv2 but is "
        f"{type(model).__name__}."
    )


def build(name: str, pretrained: bool, **model_kwargs: Any) -> nn.Module:
    """A model from its name: ``hf:ID``, a local transformers folder, ``hub:REPO:ENTRY`` or timm.

    Args:
        name: See the module docstring.
        pretrained: Load timm's pretrained weights (transformers and torch.hub models always
            load theirs).
        **model_kwargs: timm ``create_model`` arguments; for transformers, config overrides
            (``drop_path_rate`` is passed on, other timm-only keys are refused by it).

    Raises:
        OSError: If a transformers model is neither a local folder nor reachable.
        PermissionError: If the model would run code of its own (``hub:``, or
            ``trust_remote_code``) and ``NECO_TRUST_REMOTE_CODE`` is not ``1``.

    """
    _check_code_allowed(name, model_kwargs)
    folder = Path(name).expanduser()
    if name.startswith(HF_PREFIX) or (folder.is_dir() and (folder / "config.json").is_file()):
        from transformers import AutoModel

        source = name.removeprefix(HF_PREFIX)
        options = {"attn_implementation": "sdpa", "trust_remote_code": False, **model_kwargs}
        try:
            return AutoModel.from_pretrained(source, **options)
        except OSError as error:  # not a folder, not cached, and no way to download it
            reason = str(error).strip().splitlines()[0]
            raise OSError(
                f"cannot load the transformers model {source!r}: {reason} Give a local "
                "save_pretrained folder (model: PATH) or allow the download once."
            ) from error
    if name.startswith(HUB_PREFIX):
        import torch

        repo, _, entry = name.removeprefix(HUB_PREFIX).rpartition(":")
        # Allowed by _check_code_allowed: trusted explicitly rather than by torch's prompt.
        return torch.hub.load(repo, entry, trust_repo=True, **model_kwargs)
    import timm

    return timm.create_model(
        name, pretrained=pretrained, dynamic_img_size=True, num_classes=0, **model_kwargs
    )


def _check_code_allowed(name: str, model_kwargs: dict[str, Any]) -> None:
    """Refuse a model that runs code of its own unless the command line allowed it.

    Raises:
        PermissionError: Naming what would run and the flag that allows it.

    """
    if name.startswith(HUB_PREFIX):
        repo = name.removeprefix(HUB_PREFIX).rpartition(":")[0]
        what = f"model {name!r} runs the hubconf.py of {repo!r}"
    elif model_kwargs.get("trust_remote_code"):
        what = f"model_kwargs trust_remote_code runs the Python files of {name!r}"
    else:
        return
    if os.environ.get(TRUST_REMOTE_CODE) != "1":
        raise PermissionError(
            f"{what}; no config file or run folder can allow that: pass --trust-remote-code "
            "to this neco command (each time) if you trust it."
        )


def patch_size(model: Any) -> int:
    """Side of the model's square patches."""
    kind = family(model)
    if kind == "transformers":
        return int(model.config.patch_size)
    patch = model.patch_embed.patch_size if kind == "timm" else model.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def embed_dim(model: Any) -> int:
    """Token width ``D``."""
    return int(model.config.hidden_size if family(model) == "transformers" else model.embed_dim)


def prefix_tokens(model: Any) -> int:
    """CLS + register tokens before the patch tokens."""
    kind = family(model)
    if kind == "timm":
        return int(model.num_prefix_tokens)
    registers = model.config if kind == "transformers" else model
    return 1 + int(getattr(registers, "num_register_tokens", 0) or 0)


def all_tokens(model: Any, images: Tensor) -> Tensor:
    """``(B, T, D)`` final normalised tokens, CLS and registers first, then the patches."""
    import torch

    kind = family(model)
    if kind == "timm":
        return model.forward_features(images)
    if kind == "transformers":
        return model(pixel_values=images).last_hidden_state
    out = model.forward_features(images)
    parts = [out["x_norm_clstoken"][:, None]]
    if out.get("x_norm_regtokens") is not None:
        parts.append(out["x_norm_regtokens"])
    return torch.cat([*parts, out["x_norm_patchtokens"]], dim=1)


def attention_input(model: Any) -> AttentionInput:
    """The last block's attention of a model, as ``recording_cls_attention`` reads it."""
    kind = family(model)
    if kind == "transformers":
        attention = model.encoder.layer[-1].attention
        if hasattr(attention, "q_proj"):  # transformers >= 5
            return AttentionInput(
                attention,
                attention.q_proj,
                attention.k_proj,
                int(attention.config.num_attention_heads),
                float(attention.scaling),
            )
        inner = attention.attention  # transformers 4: Dinov2SelfAttention(query, key, value)
        return AttentionInput(
            inner,
            inner.query,
            inner.key,
            int(inner.num_attention_heads),
            1 / math.sqrt(inner.attention_head_size),
        )
    attention = model.blocks[-1].attn  # timm and the DINOv2 hub modules: fused qkv
    width = attention.qkv.out_features // 3

    def query(tokens: Tensor) -> Tensor:
        return attention.qkv(tokens)[..., :width]

    def key(tokens: Tensor) -> Tensor:
        return attention.qkv(tokens)[..., width : 2 * width]

    return AttentionInput(
        attention,
        query,
        key,
        int(attention.num_heads),
        float(attention.scale),
        getattr(attention, "q_norm", None),
        getattr(attention, "k_norm", None),
    )


def save_native(model: Any, output_dir: Path) -> Path | None:
    """Save a transformers backbone as ``output_dir/HF_FOLDER`` (``save_pretrained``).

    timm and torch.hub backbones need nothing more than the state dict the trainer writes.

    Returns:
        The folder, or ``None``.

    """
    if family(model) != "transformers":
        return None
    folder = output_dir / HF_FOLDER
    model.save_pretrained(folder)
    return folder
