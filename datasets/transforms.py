"""Train / test / self-supervision image transforms built from the config."""
from __future__ import annotations

from typing import Any

import torchvision.transforms as T
from timm.data.random_erasing import RandomErasing

__all__ = ["build_transforms", "build_ssl_transform", "SSL_ERASE_AREA", "TEST_INTERPOLATION"]

SSL_ERASE_AREA = 0.33  # SSL views erase 33% of the image (when erasing), as published
# The test resize (evaluation and the stage-1 feature cache) is bilinear, as published: torchvision's
# Resize default. The train resize is bicubic, as published too.
TEST_INTERPOLATION = T.InterpolationMode.BILINEAR


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
    """Published train augmentation (bicubic resize, flip, pad, crop, erase) or test (bilinear) resize."""
    if is_train:
        return T.Compose(_train_ops(cfg) + [
            RandomErasing(probability=cfg.INPUT.RE_PROB, mode="pixel", max_count=1,
                          device="cpu"),
        ])
    return T.Compose([
        T.Resize(_size(cfg.INPUT.SIZE_TEST), interpolation=TEST_INTERPOLATION),
        T.ToTensor(),
        T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD),
    ])


def build_ssl_transform(cfg: Any) -> T.Compose:
    """The train augmentation with random erasing of a fixed area, :data:`SSL_ERASE_AREA` (vision SSL views)."""
    return T.Compose(_train_ops(cfg) + [
        RandomErasing(probability=cfg.INPUT.RE_PROB, min_area=SSL_ERASE_AREA,
                      max_area=SSL_ERASE_AREA, mode="pixel", max_count=1, device="cpu"),
    ])
