"""Train / test / self-supervision image transforms built from the config."""
from __future__ import annotations

from typing import Any

import torchvision.transforms as T
from timm.data.random_erasing import RandomErasing

__all__ = ["build_transforms", "build_ssl_transform", "SSL_ERASE_AREA"]

SSL_ERASE_AREA = 1.0 / 3.0  # SSL views erase exactly a third of the image (when erasing)


def _size(v: Any) -> list[int]:
    return [int(x) for x in v]


def _train_ops(cfg: Any) -> list:
    return [
        T.Resize(_size(cfg.INPUT.SIZE_TRAIN), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=cfg.INPUT.PROB),
        T.Pad(cfg.INPUT.PADDING),
        T.RandomCrop(_size(cfg.INPUT.SIZE_TRAIN)),
        T.ToTensor(),
        T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD),
    ]


def build_transforms(cfg: Any, is_train: bool) -> T.Compose:
    """Published train augmentation (resize, flip, pad, crop, erase) or test resize."""
    if is_train:
        return T.Compose(_train_ops(cfg) + [
            RandomErasing(probability=cfg.INPUT.RE_PROB, mode="pixel", max_count=1,
                          device="cpu"),
        ])
    return T.Compose([
        T.Resize(_size(cfg.INPUT.SIZE_TEST), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD),
    ])


def build_ssl_transform(cfg: Any) -> T.Compose:
    """The train augmentation with random erasing of a fixed 1/3 area (vision SSL views)."""
    return T.Compose(_train_ops(cfg) + [
        RandomErasing(probability=cfg.INPUT.RE_PROB, min_area=SSL_ERASE_AREA,
                      max_area=SSL_ERASE_AREA, mode="pixel", max_count=1, device="cpu"),
    ])
