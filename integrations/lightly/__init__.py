"""NeCo for lightly pipelines: ``NeCoTransform`` and the ``NeCo`` LightningModule.

Needs ``pip install 'neco-loss[lightly]'``.
"""

from neco_loss.integrations.lightly.module import NeCo
from neco_loss.integrations.lightly.transform import NeCoTransform, split_views_and_boxes

__all__ = ["NeCo", "NeCoTransform", "split_views_and_boxes"]
