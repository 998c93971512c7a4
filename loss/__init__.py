"""Losses: ID (label-smoothed CE), batch-hard triplet, center, SupCon, SimCLR, SimSiam."""
from .center_loss import CenterLoss
from .make_loss import LossFunc, make_id_loss, make_loss, make_ssl_loss
from .softmax_loss import CrossEntropyLabelSmooth
from .ssl_loss import SimCLRLoss, SimSiamLoss
from .supcontrast import SupConLoss
from .triplet_loss import TripletLoss, euclidean_dist, hard_example_mining

__all__ = [
    "CenterLoss",
    "CrossEntropyLabelSmooth",
    "LossFunc",
    "SimCLRLoss",
    "SimSiamLoss",
    "SupConLoss",
    "TripletLoss",
    "euclidean_dist",
    "hard_example_mining",
    "make_id_loss",
    "make_loss",
    "make_ssl_loss",
]
