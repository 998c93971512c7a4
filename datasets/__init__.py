"""Datasets, samplers and data loaders for SVLL-ReID.

``build_dataset(name, root, **kw)`` parses a dataset into ``train``/``query``/``gallery``
lists of ``(img_path, pid, camid, viewid)``; ``make_dataloader(cfg)`` builds the loaders.
"""
from .bases import BaseImageDataset, DatasetError, DatasetLayoutError, ImageDataset, read_image
from .factory import DATASETS, build_dataset
from .make_dataloader import make_dataloader, make_val_loader
from .sampler import RandomIdentitySampler, RandomIdentitySamplerDDP, ShuffleSampler

__all__ = [
    "BaseImageDataset", "DatasetError", "DatasetLayoutError", "ImageDataset", "read_image",
    "DATASETS", "build_dataset", "make_dataloader", "make_val_loader",
    "RandomIdentitySampler", "RandomIdentitySamplerDDP", "ShuffleSampler",
]
