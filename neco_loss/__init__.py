"""neco-loss: the NeCo patch-neighbour-consistency loss as a plug-in (Pariza et al., 2024)."""

from neco_loss.sorting import SoftSorter, get_sorter, soft_permutation

__all__ = ["SoftSorter", "get_sorter", "soft_permutation"]
__version__ = "0.1.0"
