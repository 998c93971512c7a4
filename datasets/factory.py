"""Dataset registry: ``build_dataset(name, root, **kw)``."""
from __future__ import annotations

from typing import Any

from config import DATASET_NAMES

from .bases import BaseImageDataset, check_published_statistics
from .dukemtmcreid import DukeMTMCreID
from .folder import FolderDataset
from .market1501 import Market1501
from .msmt17 import MSMT17
from .occ_duke import OccludedDuke
from .vehicleid import VehicleID
from .veri import VeRi

__all__ = ["DATASETS", "build_dataset"]

DATASETS: dict[str, type[BaseImageDataset]] = {
    "market1501": Market1501,
    "dukemtmc": DukeMTMCreID,
    "msmt17": MSMT17,
    "occ_duke": OccludedDuke,
    "veri": VeRi,
    "VehicleID": VehicleID,
    "folder": FolderDataset,
}
# config offers these names (DATASETS.NAMES, checked when a config loads); the registry implements exactly them
if tuple(DATASETS) != DATASET_NAMES:
    raise ImportError(f"datasets.factory.DATASETS {tuple(DATASETS)} and config.DATASET_NAMES {DATASET_NAMES} differ")


def build_dataset(name: str, root: str, strict_stats: bool = False, **kwargs: Any) -> BaseImageDataset:
    """Parse dataset ``name`` under ``root`` and compare its splits with the benchmark's published
    statistics (a warning, or with ``strict_stats`` an error; VehicleID's trial 0 only, the
    other trials split the same list).

    Keyword arguments: ``need_views`` (all; VeRi errors without view labels), ``test_only``
    (all; query and gallery only, the training split need not exist),
    ``test_size``/``trial``/``seed`` (VehicleID).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    dataset = DATASETS[name](root=root, **kwargs)
    if not kwargs.get("trial"):
        check_published_statistics(dataset, strict_stats)
    return dataset
