"""Occluded-Duke (Miao et al., ICCV 2019): DukeMTMC-reID re-split with occluded queries."""
from __future__ import annotations

from .market1501 import MarketStyleDataset

__all__ = ["OccludedDuke"]


class OccludedDuke(MarketStyleDataset):
    """``<root>/dukemtmcreid/Occluded_Duke/{bounding_box_train,query,bounding_box_test}``."""

    name = "Occluded-Duke"
    dataset_dir = "dukemtmcreid/Occluded_Duke"
    scheme = "PPPP_cC_fFFFFFFF.jpg, e.g. 0001_c2_f0046182.jpg"
