"""Atomic, code-free checkpoints of a training run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LAST = "checkpoint_last.pt"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename.

    A crash mid-write leaves the previous file intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file).

    Raises:
        FileNotFoundError: If there is no checkpoint.
        ValueError: If the file is corrupt or not a checkpoint of ``neco train``.

    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({error}).") from error
    required = {"step", "student", "teacher", "optimizer", "criterion", "config", "rng"}
    if not isinstance(state, dict) or not required <= set(state):
        raise ValueError(f"{path} is not a neco train checkpoint (needs keys {sorted(required)}).")
    return state
