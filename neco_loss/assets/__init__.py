"""Weights shipped inside the package, by name, checked against their SHA-256.

``weights: testbed`` (YAML), ``--weights testbed`` or ``DenseViT(..., checkpoint="testbed")``
loads the testbed backbone (``neco_loss.testbed``) without a download.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FOLDER = Path(__file__).parent
# name -> (file in this folder, SHA-256 of its bytes); the command that made each file is in
# the module that trains it (testbed: ``neco testbed-backbone``, docs/evaluation.md).
SHIPPED: dict[str, tuple[str, str]] = {
    "testbed": (
        "testbed_vit.pt",
        "f40ff0884d440b9a0a4c1dc67529cfcbf824bb4aa9357c93a4d06e98c9fb61f0",
    ),
}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_shipped(name: str | Path) -> bool:
    """Whether ``name`` names shipped weights (rather than a path)."""
    return isinstance(name, str) and name in SHIPPED


def shipped_weights(name: str) -> Path:
    """Path of the shipped weights ``name``, after checking their checksum.

    Raises:
        ValueError: If ``name`` is not shipped, or the file does not match its SHA-256 (damaged
            or replaced).

    """
    if name not in SHIPPED:
        raise ValueError(f"no shipped weights named {name!r}; shipped: {sorted(SHIPPED)}.")
    file, expected = SHIPPED[name]
    path = FOLDER / file
    digest = file_sha256(path) if path.is_file() else "missing"
    if digest != expected:
        raise ValueError(
            f"shipped weights {path} have SHA-256 {digest}, not {expected}: the file is damaged "
            "or was replaced; reinstall the package."
        )
    return path
