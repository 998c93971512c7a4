"""Image transforms built from the config: the loaders' CPU half (uint8) and the published reference.

The loaders split the published pipeline in two (docs/data.md, "What runs where"):

* on the CPU, in the loader workers: decoding and the geometry, giving uint8 CHW tensors —
  :class:`TestTransform` (bilinear resize) and :class:`TrainTransform` (bicubic resize, then
  flip, pad, crop per view). Both resize with :func:`datasets.resample.resize_image`, which gives
  Pillow's result bit for bit in a fraction of its time;
* on the training device, on whole batches: float conversion, normalisation and random
  erasing (:mod:`datasets.device_transforms`).

:func:`build_transforms` / :func:`build_ssl_transform` keep the published per-image CPU
pipeline (torchvision ``Compose`` with ``ToTensor``, ``Normalize`` and timm's
``RandomErasing``) as the reference the tests compare the split pipeline with.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.random_erasing import RandomErasing

from utils.images import to_rgb

from .resample import FILTERS, resize_image, warm_up

__all__ = ["build_transforms", "build_ssl_transform", "build_loader_transform", "TestTransform",
           "TrainTransform", "SSL_ERASE_AREA", "TEST_INTERPOLATION", "TRAIN_INTERPOLATION"]

# The SSL views' erasing area range: the published code gives timm min_area=0.33, max_area=1/3, so each
# area is drawn uniformly from [0.33, 0.3333...].
SSL_ERASE_AREA = (0.33, 1 / 3)
# The test resize (evaluation and the stage-1 feature cache) is bilinear, as published: torchvision's
# Resize default. The train resize is bicubic, as published too.
TEST_INTERPOLATION = T.InterpolationMode.BILINEAR
TRAIN_INTERPOLATION = T.InterpolationMode.BICUBIC


def _size(v: Any) -> list[int]:
    size = [int(x) for x in v]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"an input size is [height, width] with positive values, got {list(v)}")
    return size


def _filter_name(interpolation: T.InterpolationMode) -> str:
    name = T.InterpolationMode(interpolation).value
    if name not in FILTERS:
        raise ValueError(f"the loaders resize with one of {sorted(FILTERS)}, not {name!r}")
    return name


_TRAIN_FILTER = _filter_name(TRAIN_INTERPOLATION)


def _resized(img: Image.Image, size: list[int], filter_name: str) -> np.ndarray:
    """``img`` resized to ``size`` (h, w) as Pillow resizes it, as a (3, h, w) uint8 array."""
    if img.mode != "RGB":
        img = to_rgb(img)
    return resize_image(img, size, filter_name)


class TestTransform:
    """The test transform's CPU half: resize to ``size`` (bilinear, as published) -> uint8 (3, H, W).

    Deterministic. :class:`datasets.device_transforms.DeviceTransform` finishes it on the device
    (``/255``, normalise), which gives what ``Resize + ToTensor + Normalize`` gives.
    """

    __test__ = False     # a transform, not a test class for pytest

    def __init__(self, size: Any, interpolation: T.InterpolationMode = TEST_INTERPOLATION) -> None:
        self.size, self.interpolation = _size(size), interpolation
        self._filter = _filter_name(interpolation)
        warm_up()                       # compiled here, before loader workers are forked

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(_resized(img, self.size, self._filter))

    def __repr__(self) -> str:
        return f"TestTransform(size={self.size}, interpolation={self.interpolation.value})"


class TrainTransform:
    """The train augmentation's CPU half: resize to ``size`` (bicubic), then per view a horizontal
    flip with probability ``flip_prob``, a zero pad of ``padding`` pixels on every side and a
    random crop back to ``size`` -> uint8 (3, H, W). Erasing follows on the device.

    Each view draws from torch's global RNG exactly what ``RandomHorizontalFlip(p)`` then
    ``Pad(padding)`` + ``RandomCrop(size)`` draw (one ``torch.rand(1)``; then, when padding > 0,
    ``torch.randint`` for the top and the left offset), so under the same RNG state a view equals
    the torchvision composition on the PIL image pixel for pixel.

    :meth:`views` resizes once and draws the flip/pad/crop of each view independently: the resize
    is deterministic, so ``resize(img)`` is the same image in every one of several independent
    full pipelines, and only the draws after it are random. Views made from one resize therefore
    have the same joint distribution as independent full pipelines (each view with its own flip,
    pad and crop, independent of the others); only the order in which the RNG is consumed differs.
    """

    def __init__(self, size: Any, flip_prob: float, padding: int) -> None:
        self.size, self.flip_prob, self.padding = _size(size), float(flip_prob), int(padding)
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        warm_up()                       # compiled here, before loader workers are forked

    def resize(self, img: Image.Image) -> np.ndarray:
        """The deterministic part: the bicubic resize, as a (3, H, W) uint8 array."""
        return _resized(img, self.size, _TRAIN_FILTER)

    def view(self, chw: np.ndarray) -> torch.Tensor:
        """One random flip/pad/crop of a resized (3, H, W) uint8 array, as a new tensor."""
        flip = bool(torch.rand(1) < self.flip_prob)
        src = chw[:, :, ::-1] if flip else chw
        p = self.padding
        _, h, w = src.shape
        if p == 0:                      # RandomCrop of the full size: no draw, the image itself
            return torch.from_numpy(np.array(src))
        top = int(torch.randint(0, 2 * p + 1, size=(1,)).item())
        left = int(torch.randint(0, 2 * p + 1, size=(1,)).item())
        # output (r, c) = padded (top + r, left + c) = source (r + dy, c + dx), zero outside the source
        dy, dx = top - p, left - p
        out = np.zeros_like(chw)
        r0, r1 = max(0, -dy), min(h, h - dy)
        c0, c1 = max(0, -dx), min(w, w - dx)
        if r0 < r1 and c0 < c1:
            out[:, r0:r1, c0:c1] = src[:, r0 + dy:r1 + dy, c0 + dx:c1 + dx]
        return torch.from_numpy(out)

    def views(self, img: Image.Image, n: int) -> list[torch.Tensor]:
        """``n`` independently augmented views of ``img`` from one resize (see the class docstring)."""
        chw = self.resize(img)
        return [self.view(chw) for _ in range(n)]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.views(img, 1)[0]

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, flip_prob={self.flip_prob}, padding={self.padding})"


def build_loader_transform(cfg: Any, is_train: bool) -> TrainTransform | TestTransform:
    """The loaders' CPU half of the train (``is_train``) or test transform, giving uint8 images."""
    if is_train:
        return TrainTransform(cfg.INPUT.SIZE_TRAIN, cfg.INPUT.PROB, cfg.INPUT.PADDING)
    return TestTransform(cfg.INPUT.SIZE_TEST)


# ----------------------------------------------------------------------------- the published reference
def _train_ops(cfg: Any) -> list:
    return [
        T.Resize(_size(cfg.INPUT.SIZE_TRAIN), interpolation=TRAIN_INTERPOLATION),
        T.RandomHorizontalFlip(p=cfg.INPUT.PROB),
        T.Pad(cfg.INPUT.PADDING),
        T.RandomCrop(_size(cfg.INPUT.SIZE_TRAIN)),
        T.ToTensor(),
        T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD),
    ]


def build_transforms(cfg: Any, is_train: bool) -> T.Compose:
    """The published per-image CPU pipeline, float output: train augmentation (bicubic resize, flip,
    pad, crop, erase) or test (bilinear) resize. The reference of the split pipeline; the loaders
    use :func:`build_loader_transform` + ``DeviceTransform``."""
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
    """The published SSL view pipeline (reference): the train augmentation with random erasing of an
    area in :data:`SSL_ERASE_AREA` (about a third of the image)."""
    return T.Compose(_train_ops(cfg) + [
        RandomErasing(probability=cfg.INPUT.RE_PROB, min_area=SSL_ERASE_AREA[0],
                      max_area=SSL_ERASE_AREA[1], mode="pixel", max_count=1, device="cpu"),
    ])
