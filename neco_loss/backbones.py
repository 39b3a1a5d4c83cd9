"""Build a ViT by name and run it through its family (``neco_loss.backbone_families``).

Names: a timm model (``vit_small_patch14_reg4_dinov2``, ``vit_small_patch16_dinov3``),
``hf:ID`` or a local transformers ``save_pretrained`` folder, ``hub:REPO:ENTRY``. A name of no
supported family is refused before any weights are made or downloaded.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from neco_loss.backbone_families import (
    FAMILIES,
    TIMM_MODULES,
    TRANSFORMERS_TYPES,
    family_of,
    supported_families,
)
from neco_loss.checks import did_you_mean

HF_PREFIX = "hf:"  # model names that HuggingFace transformers builds
HUB_PREFIX = "hub:"  # "hub:REPO:ENTRY", e.g. hub:facebookresearch/dinov2:dinov2_vits14_reg
# "1" allows models that run code of theirs (a torch.hub repo's hubconf.py, a transformers
# folder's Python files). `neco --trust-remote-code` sets it for one command; the CLI clears it
# otherwise, so that no config file, run folder or shell profile can allow it.
TRUST_REMOTE_CODE = "NECO_TRUST_REMOTE_CODE"


def family(model: Any) -> str:
    """The name of a built model's family (``FAMILIES``); ``TypeError`` for others."""
    return family_of(model).name


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
        _check_transformers_folder(Path(source).expanduser())
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
        repo, _, entry = name.removeprefix(HUB_PREFIX).rpartition(":")
        # Allowed by _check_code_allowed: trusted explicitly rather than by torch's prompt.
        return torch.hub.load(repo, entry, trust_repo=True, **model_kwargs)
    import timm

    options = {"dynamic_img_size": True, "num_classes": 0, **model_kwargs}
    _check_timm_model(name, options)
    if pretrained:
        _check_pretrained_reachable(name)
    return timm.create_model(name, pretrained=pretrained, **options)


def _check_pretrained_reachable(name: str) -> None:
    """Fail fast when timm's pretrained weights are neither cached nor downloadable.

    Offline, timm's download retries for minutes before it gives up.

    Raises:
        ValueError: If timm has no pretrained weights for ``name``.
        OSError: If they are not cached and the hub is offline or unreachable, in one line
            with the way out.

    """
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    if config is None or not (config.hf_hub_id or config.url):
        raise ValueError(f"timm has no pretrained weights for {name!r}: pretrained: false.")
    if config.hf_hub_id:
        repo = config.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return
    host = "huggingface.co" if config.hf_hub_id else (urlparse(str(config.url)).hostname or "")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _reachable(host):
        raise OSError(
            f"the pretrained weights of {name!r} are not cached and {host} cannot be reached "
            "(offline?): download them once where there is internet, or give a local file "
            "(weights: FILE) or pretrained: false."
        )


def _reachable(host: str, seconds: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=seconds).close()
    except OSError:
        return False
    return True


def _check_transformers_folder(folder: Path) -> None:
    """Refuse a local transformers folder of a type no family covers, before reading weights.

    Raises:
        ValueError: Naming its type and the supported ones.

    """
    if not (folder / "config.json").is_file():
        return  # a hub id: its type is known once transformers has fetched it
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in TRANSFORMERS_TYPES:
        raise ValueError(
            f"model {str(folder)!r} is a transformers {model_type!r} model; the supported "
            f"types are {list(TRANSFORMERS_TYPES)}. Supported: {supported_families()}."
        )


def _check_timm_model(name: str, options: dict[str, Any]) -> None:
    """Refuse a timm name that is no model or of no family, before any weights are made.

    The family is read off a copy built on the meta device: nothing allocated or downloaded.

    Raises:
        ValueError: Naming the nearest supported timm model.

    """
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"model {name!r} is not a timm model{_nearest_timm(name)}. Supported: "
            f"{supported_families()}."
        )
    try:
        with torch.device("meta"):
            probe: Any = timm.create_model(name, pretrained=False, **options)
    except TypeError as error:  # a timm model that is no ViT takes no dynamic_img_size
        if "dynamic_img_size" not in str(error):
            raise
        probe = None
    if probe is None or not any(family.recognises(probe) for family in FAMILIES.values()):
        raise ValueError(
            f"model {name!r} is not a ViT of a supported family{_nearest_timm(name)}. "
            f"Supported: {supported_families()}."
        )


def _nearest_timm(name: str) -> str:
    """`` (did you mean 'x'?)`` among the timm ViTs of the families, for a refusal only."""
    import timm

    return did_you_mean(name, timm.list_models(module=list(TIMM_MODULES)))


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
    return family_of(model).patch_size(model)


def prefix_tokens(model: Any) -> int:
    """CLS + register tokens before the patch tokens."""
    return family_of(model).prefix_tokens(model)


def has_cls_token(model: Any) -> bool:
    """Whether the model's first token is a CLS token (a ``loss_mask`` needs its attention)."""
    return family_of(model).has_cls_token(model)


def save_native(model: Any, output_dir: Path) -> Path | None:
    """Save a backbone in its own format into ``output_dir`` where the state dict is not it.

    Returns:
        The path (transformers: ``output_dir/HF_FOLDER``, ``save_pretrained``), or ``None``.

    """
    return family_of(model).save(model, output_dir)
