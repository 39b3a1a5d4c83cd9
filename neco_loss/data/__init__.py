"""Datasets and the multi-crop transform that feeds the NeCo loss."""

from neco_loss.data.folder import ImageFolder
from neco_loss.data.multicrop import NeCoMultiCrop
from neco_loss.data.synthetic import CLASS_NAMES, SyntheticScenes

__all__ = ["CLASS_NAMES", "ImageFolder", "NeCoMultiCrop", "SyntheticScenes"]
