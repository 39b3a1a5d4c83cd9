"""What ``neco eval --checkpoint`` names, made into a backbone: a trained run or a starting point.

A ``--checkpoint`` is, tried in this order:

- a training config (``.yaml``): the model it *starts* from (``model``, ``model_kwargs``,
  ``weights``, ``pretrained``, ``partial_weights``), so ``neco eval ... --checkpoint
  my.yaml`` scores the start and ``--checkpoint OUTPUT_DIR`` the result;
- a run folder (its ``backbone.pt`` or ``backbone_hf/`` with its ``config.yaml``), or a weights
  file with ``--config``;
- shipped weights (``testbed``: the testbed model with its weights);
- ``hf:ID``, ``hub:REPO:ENTRY`` or a local transformers folder: that model as it is;
- a timm model name: the model with timm's pretrained weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_config(path: Path) -> bool:
    """Whether ``path`` is a training config file (rather than a run or weights)."""
    return path.suffix in (".yaml", ".yml") and path.is_file()


def scored_backbone(checkpoint: Path, config_path: Path | None) -> Any:
    """The ``DenseViT`` (eval mode) that a ``--checkpoint`` names (see the module docstring).

    Raises:
        SystemExit: With one line naming what is missing, unreadable or not finite.

    """
    from neco_loss import assets
    from neco_loss.backbone_families import HF_FOLDER
    from neco_loss.models import DenseViT

    spec = str(checkpoint)
    try:
        if is_config(checkpoint):
            model = _starting_backbone(checkpoint)
        elif checkpoint.exists() and not (checkpoint / "config.json").is_file():
            if (checkpoint / HF_FOLDER).is_dir():  # a transformers run: save_pretrained folder
                model = DenseViT(str(checkpoint / HF_FOLDER))
            else:
                model = _trained_backbone(checkpoint, config_path)
        elif assets.is_shipped(spec):
            from neco_loss.testbed import TESTBED_MODEL, TESTBED_MODEL_KWARGS

            model = DenseViT(TESTBED_MODEL, checkpoint=spec, **TESTBED_MODEL_KWARGS)
        else:
            model = _named_model(spec)
    except (ValueError, OSError) as error:  # a misfit, a foreign file, an unreachable model
        raise SystemExit(f"error: --checkpoint {spec}: {error}") from None
    return _finite_weights(model.eval(), checkpoint)


def _starting_backbone(config_path: Path) -> Any:
    from neco_loss.training import load_config
    from neco_loss.training.assembly import build_backbone

    return build_backbone(load_config(config_path))


def _trained_backbone(checkpoint: Path, config_path: Path | None) -> Any:
    """A run folder's ``backbone.pt``, or a weights file with ``--config``."""
    from neco_loss.models import DenseViT
    from neco_loss.training import load_config

    weights = checkpoint
    if checkpoint.is_dir():  # a run's output_dir
        weights, config_path = checkpoint / "backbone.pt", config_path or checkpoint / "config.yaml"
    if config_path is None:
        raise SystemExit(
            f"error: --checkpoint {checkpoint} is a weights file: also give --config (the run's "
            "config.yaml), or pass the run folder instead."
        )
    for path in (weights, config_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist (from --checkpoint {checkpoint}).")
    config = load_config(config_path)
    return DenseViT(config.model, checkpoint=weights, **config.model_kwargs)


def _named_model(spec: str) -> Any:
    """``hf:``/``hub:``/transformers folder as it is; a timm name with its pretrained weights."""
    from neco_loss.backbones import HF_PREFIX, HUB_PREFIX
    from neco_loss.models import DenseViT

    if spec.startswith((HF_PREFIX, HUB_PREFIX)) or Path(spec).is_dir():
        return DenseViT(spec)
    import timm

    if not timm.is_model(spec):
        raise SystemExit(
            f"error: --checkpoint {spec}: no such run folder, weights file, training config, "
            "shipped weights (testbed) or model name (hf:ID, a transformers folder, a timm "
            "name)."
        )
    return DenseViT(spec, pretrained=True)


def _finite_weights(model: Any, checkpoint: Path) -> Any:
    """``model`` if all its weights are finite.

    Raises:
        SystemExit: Naming the checkpoint and the count: a diverged run's scores would be
            those of garbage features.

    """
    import torch

    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    bad = sum(int((~torch.isfinite(tensor)).sum()) for tensor in tensors)
    if bad:
        total = sum(tensor.numel() for tensor in tensors)
        raise SystemExit(
            f"error: --checkpoint {checkpoint}: {bad} of its {total} weights are NaN or "
            "infinite; there is nothing to score."
        )
    return model
