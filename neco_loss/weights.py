"""Weights files into backbones: read safely, loaded strictly, a misfit explained in one line.

A file must fit the model exactly (every weight, no extra one, every shape) unless a partial
load is asked for explicitly (``partial=True``; ``partial_weights: true`` in a training
config), which loads the tensors that fit and warns once with what it left out. A misfit names
the missing, unexpected and reshaped weights and the likely cause: other register tokens,
another depth, width or position grid, a training checkpoint instead of ``backbone.pt``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neco_loss import assets
from neco_loss.checks import error_cause

SHOWN = 3  # names listed per kind of misfit
# Register tokens under the families' names: timm reg_token, transformers
# embeddings.register_tokens, the torch.hub modules' register_tokens, each (1, R, D).
REGISTER_KEYS = ("reg_token", "register_tokens")
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:blocks|layer)\.(\d+)\.")
POSITION_KEYS = ("pos_embed", "position_embeddings")
TRAINING_KEYS = ("student", "teacher", "optimizer")  # neco train's checkpoint_last.pt
AUTHORS_HEAD = "projection_head."  # the NeCo authors' DinoVisionTransformer head


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a local checkpoint: a state dict, or one under ``"model"``/``"state_dict"``.

    ``path`` may also name weights shipped in the package (``neco_loss.assets``, e.g.
    ``"testbed"``). Half-precision weights are returned as they are; ``load_state_dict`` of a
    float32 model converts them.

    Loaded with ``weights_only=True``: a checkpoint cannot run code.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be read (truncated, not a torch file) or holds no tensor
            dictionary (a training checkpoint: the message names ``backbone.pt`` beside it).

    """
    if isinstance(path, str) and assets.is_shipped(path):
        path = assets.shipped_weights(path)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({error_cause(error)}).") from error
    for key in ("model", "state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if isinstance(content, dict) and all(key in content for key in TRAINING_KEYS):
        raise ValueError(
            f"checkpoint {path} is a training checkpoint (student, teacher, optimizer), not "
            f"backbone weights: give {path.parent / 'backbone.pt'}, the student backbone "
            "that the run writes beside it."
        )
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors.")
    return content


def load_weights(model: nn.Module, checkpoint: str | Path, partial: bool = False) -> None:
    """Load a local checkpoint (see ``load_state_dict``) into ``model``, strictly.

    Args:
        model: The backbone (its own module, e.g. a timm ``VisionTransformer``).
        checkpoint: A weights file or the name of shipped weights.
        partial: Load only the tensors whose names and shapes fit; warn once with what was
            left out (the rest keeps the model's initialisation).

    Raises:
        ValueError: If the file does not fit (with ``partial``: if nothing fits), naming the
            misfits, their likely cause and the opt-out.

    """
    state = load_state_dict(checkpoint)
    expected = model.state_dict()
    if any(key not in expected for key in state):
        state = dinov2_layout_for_timm(state, model) or state
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    misfit = _misfit(missing, unexpected, reshaped)
    if not misfit:
        model.load_state_dict(state)
        return
    cause = likely_cause(state, expected, checkpoint)
    if not partial:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the model: {misfit}.{cause} To load only "
            "the weights that fit, set partial_weights: true (--partial-weights true)."
        )
    fitting = {
        key: value
        for key, value in state.items()
        if key in expected and value.shape == expected[key].shape
    }
    if not fitting:
        raise ValueError(f"checkpoint {checkpoint} has no weight that fits the model: {misfit}.")
    model.load_state_dict(fitting, strict=False)
    warnings.warn(
        f"partial_weights: loaded {len(fitting)} of the model's {len(expected)} weights from "
        f"{checkpoint}; left as built: {misfit}.{cause}",
        stacklevel=2,
    )


def dinov2_layout_for_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor] | None:
    """A file in the official DINOv2 layout, converted for a timm ViT (else ``None``).

    That layout (facebookresearch/dinov2) is how the NeCo authors release their checkpoints
    (``neco_on_dinov2r_vit14_model.ckpt``: their vendored ``DinoVisionTransformer``, with its
    ``projection_head``, which is left out). Also reads the authors' training checkpoints,
    whose student backbone sits under ``model.`` (their loader keeps those keys). The
    conversion is timm's own (``checkpoint_filter_fn``: ``register_tokens`` -> ``reg_token``,
    the CLS position folded into ``cls_token``, the position grid resampled to the model's).
    """
    if "model.mask_token" in state:  # the authors' training checkpoint: the student's weights
        state = {
            key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")
        }
    if "mask_token" not in state:
        return None
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        return None
    backbone = {key: value for key, value in state.items() if not key.startswith(AUTHORS_HEAD)}
    return checkpoint_filter_fn(backbone, model)


def _misfit(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    """``"2 missing (e.g. [...]); 1 unexpected (...)"``, or ``""`` for a file that fits."""
    parts = [
        f"{len(names)} {kind} (e.g. {names[:SHOWN]})"
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", reshaped),
        )
        if names
    ]
    return "; ".join(parts)


def likely_cause(state: dict[str, Tensor], expected: dict[str, Any], checkpoint: object) -> str:
    """`` Likely: ...`` sentences for the misfits they explain (``""`` when none does)."""
    kinds = {_kind(name) for name in expected}
    if len({_kind(name) for name in state} & kinds) < len(kinds) / 2:  # another model's names
        prefix = _nesting_prefix(state, expected)
        return (
            f" Likely: the file nests the model's weights under {prefix!r}: save the backbone's "
            "own state dict (its keys without that prefix)."
            if prefix
            else " Likely: the file holds the weights of another kind of model."
        )
    causes = []
    file_registers, model_registers = _registers(state), _registers(expected)
    if file_registers != model_registers:
        causes.append(
            f"the file has {file_registers or 'no'} register tokens, the model has "
            f"{model_registers or 'none'}: use a model with "
            + (
                f"{file_registers} (e.g. vit_small_patch14_reg4_dinov2, or model_kwargs "
                f"reg_tokens: {file_registers})"
                if file_registers
                else "none (e.g. vit_small_patch14_dinov2)"
            )
        )
    file_depth, model_depth = _depth(state), _depth(expected)
    if file_depth != model_depth:
        causes.append(
            f"the file has {file_depth} blocks, the model {model_depth}: model_kwargs depth: "
            f"{file_depth}"
        )
    for key in POSITION_KEYS:
        names = [name for name in expected if name.endswith(key) and name in state]
        if names and state[names[0]].shape != expected[names[0]].shape:
            causes.append(
                "another position grid (img_size / patch_size in model_kwargs) or width (embed_dim)"
            )
    if checkpoint == "testbed":
        causes.append(
            "the testbed weights fit the model of examples/recipes/tiny_cpu.yaml "
            "(neco_loss.testbed.TESTBED_MODEL_KWARGS)"
        )
    return "".join(f" Likely: {cause}." for cause in causes)


def _nesting_prefix(state: dict[str, Tensor], expected: dict[str, Any]) -> str | None:
    """The prefix under which the file holds most of the model's names, e.g. ``"backbone."``."""
    first = next(iter(expected))
    for name in state:
        if name.endswith("." + first):
            prefix = name[: -len(first)]
            if sum(prefix + key in state for key in expected) >= len(expected) / 2:
                return prefix
    return None


def _kind(name: str) -> str:
    """A name without its block index: ``blocks.3.mlp.fc1.weight`` -> ``blocks.#.mlp...``."""
    return BLOCK_INDEX.sub(lambda match: match.group(0).replace(match.group(1), "#"), name)


def _registers(state: dict[str, Any]) -> int:
    for name, value in state.items():
        if name.split(".")[-1] in REGISTER_KEYS:
            return int(value.shape[1])
    return 0


def _depth(state: dict[str, Any]) -> int:
    indices = {int(match.group(1)) for name in state if (match := BLOCK_INDEX.search(name))}
    return max(indices) + 1 if indices else 0
