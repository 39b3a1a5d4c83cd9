"""Soft sorting networks that return soft permutation matrices, behind one interface."""

from neco_loss.sorting.networks import NETWORKS
from neco_loss.sorting.relaxations import RELAXATIONS
from neco_loss.sorting.sorter import BACKENDS, SoftSorter, get_sorter, soft_permutation

__all__ = ["BACKENDS", "NETWORKS", "RELAXATIONS", "SoftSorter", "get_sorter", "soft_permutation"]
