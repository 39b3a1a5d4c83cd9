"""``register()``: make ``method: neco`` and the DINOv2-registers backbones known to solo-learn.

Supported: solo-learn's GitHub main (``setup.py`` version 1.0.6; omegaconf configs,
``lightning.pytorch``). PyPI's solo-learn 1.0.2 (2021) has another API and cannot run under
Lightning 2; it is detected and refused.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

SUPPORTED_SOLO = (
    "solo-learn from its GitHub main (version 1.0.6): "
    "pip install git+https://github.com/vturrisi/solo-learn.git"
)


def require_solo_main() -> None:
    """Raise an ``ImportError`` unless the installed solo-learn is the supported one."""
    if importlib.util.find_spec("solo") is None:
        raise ImportError(
            f"solo-learn is not installed; NeCo's solo-learn adapter needs {SUPPORTED_SOLO}."
        )
    if not _has_module("solo.args.pretrain"):
        try:
            version = importlib.metadata.version("solo-learn")
        except importlib.metadata.PackageNotFoundError:
            version = "of unknown version"
        raise ImportError(
            f"solo-learn {version} is installed, but NeCo's adapter supports only "
            f"{SUPPORTED_SOLO} (PyPI's 1.0.2 has another API and needs torch 1.9)."
        )


def _has_module(name: str) -> bool:
    """Whether ``name`` can be imported (``False`` also when a parent package is missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def register() -> None:
    """Add ``"neco"`` to ``solo.methods.METHODS`` and the DINOv2 backbones to solo-learn's table.

    Safe to call more than once.

    Raises:
        ImportError: If solo-learn is missing or not the supported version.

    """
    require_solo_main()
    from neco_loss.integrations.solo_learn.backbones import BACKBONES
    from neco_loss.integrations.solo_learn.method import NeCo
    from solo.methods import METHODS
    from solo.methods.base import BaseMethod

    METHODS["neco"] = NeCo
    BaseMethod._BACKBONES.update(BACKBONES)
