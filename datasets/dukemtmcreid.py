"""DukeMTMC-reID (Ristani et al. 2016; Zheng et al. 2017): 702 train ids, 8 cameras."""
from __future__ import annotations

from .market1501 import MarketStyleDataset

__all__ = ["DukeMTMCreID"]


class DukeMTMCreID(MarketStyleDataset):
    """``<root>/dukemtmcreid/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}``."""

    name = "DukeMTMC-reID"
    dataset_dir = "dukemtmcreid/DukeMTMC-reID"
    scheme = "PPPP_cC_fFFFFFFF.jpg, e.g. 0001_c2_f0046182.jpg"
