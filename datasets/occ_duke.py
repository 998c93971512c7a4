"""Occluded-Duke (Miao et al., ICCV 2019): DukeMTMC-reID re-split with occluded queries."""
from __future__ import annotations

from .market1501 import MarketStyleDataset

__all__ = ["OccludedDuke"]


class OccludedDuke(MarketStyleDataset):
    """``<root>/dukemtmcreid/Occluded_Duke/{bounding_box_train,query,bounding_box_test}``."""

    name = "Occluded-Duke"
    dataset_dir = "dukemtmcreid/Occluded_Duke"
    # Miao et al. 2019: 702 / 519 / 1,110 identities, 15,618 / 2,210 / 17,661 images; 8 cameras (DukeMTMC's)
    published_stats = {"train": (702, 15618, 8), "query": (519, 2210, None), "gallery": (1110, 17661, None)}
    scheme = "PPPP_cC_fFFFFFFF.jpg, e.g. 0001_c2_f0046182.jpg"
