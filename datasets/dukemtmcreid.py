"""DukeMTMC-reID (Ristani et al. 2016; Zheng et al. 2017): 702 train ids, 8 cameras."""
from __future__ import annotations

from .market1501 import MarketStyleDataset

__all__ = ["DukeMTMCreID"]


class DukeMTMCreID(MarketStyleDataset):
    """``<root>/dukemtmcreid/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}``."""

    name = "DukeMTMC-reID"
    dataset_dir = "dukemtmcreid/DukeMTMC-reID"
    # torchreid / fast-reid docstrings: 702 + 702 identities, 16,522 / 2,228 / 17,661 images, 8 cameras;
    # the gallery's 1,110 identities are the 702 test ones and the 408 distractors
    published_stats = {"train": (702, 16522, 8), "query": (702, 2228, 8), "gallery": (1110, 17661, 8)}
    scheme = "PPPP_cC_fFFFFFFF.jpg, e.g. 0001_c2_f0046182.jpg"
