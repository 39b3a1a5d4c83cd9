"""NeCo for solo-learn: the ``neco`` method, DINOv2-registers backbones, boxed multi-crop.

Needs solo-learn from its GitHub main (``docs/solo_learn.md``)::

    from neco_loss.integrations.solo_learn import register
    register()  # solo's METHODS gains "neco", its backbone table "dinov2_vits14_reg"

or train from a solo-learn YAML with the ``neco-solo-pretrain`` command. ``BoxedMultiCrop`` and
``neco_method_kwargs`` work without solo-learn.
"""

from typing import Any

from neco_loss.integrations.solo_learn.config import neco_method_kwargs
from neco_loss.integrations.solo_learn.registry import register, require_solo_main
from neco_loss.integrations.solo_learn.transform import BoxedMultiCrop

__all__ = ["BoxedMultiCrop", "NeCo", "neco_method_kwargs", "register"]


def __getattr__(name: str) -> Any:
    """``NeCo`` imports solo-learn, so it is loaded on first use (after the version check)."""
    if name == "NeCo":
        require_solo_main()
        from neco_loss.integrations.solo_learn.method import NeCo

        return NeCo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
