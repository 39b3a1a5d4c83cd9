"""neco-loss: the NeCo patch-neighbour-consistency loss as a plug-in (Pariza et al., 2024)."""

from neco_loss.diagnostics import NeCoStats
from neco_loss.functional import neco_loss
from neco_loss.geometry import align_pair
from neco_loss.loss import NeCoLoss
from neco_loss.sorting import SoftSorter, get_sorter, soft_permutation

__all__ = [
    "NeCoLoss",
    "NeCoStats",
    "SoftSorter",
    "align_pair",
    "get_sorter",
    "neco_loss",
    "soft_permutation",
]
__version__ = "0.1.0"
