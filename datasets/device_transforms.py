"""The device half of the image pipeline: uint8 batches -> normalised float, and random erasing.

The loaders deliver uint8 (B, 3, H, W) batches (:mod:`datasets.transforms`); these functions
finish them where the model runs, on whole batches:

* :func:`normalize_uint8`: ``x / 255``, then ``(x - mean) / std``, the operations of
  torchvision's ``ToTensor`` + ``Normalize`` in the same order and dtype (bit-identical on the CPU);
* :func:`random_erase`: timm's ``RandomErasing(mode='pixel', max_count=1)`` for every image of
  the batch at once, same rules (below), drawing from a given ``torch.Generator``;
* :class:`DeviceTransform`: both, for the image keys of a batch dict, built from the config.

timm's rules, per image of height h and width w: erase with probability p (skip when
``random() > p``); up to 10 attempts, each drawing an area fraction uniform in [min_area,
max_area] and a log aspect ratio uniform in [log 0.3, log 1/0.3]; box height
``round(sqrt(a * h * w * r))`` and width ``round(sqrt(a * h * w / r))`` (round half to even);
the first attempt whose box is strictly smaller than the image in both sides is placed at a
top-left corner uniform over the positions that keep it inside, and its pixels (every channel)
get independent N(0, 1) values, in the normalised space; no valid attempt: nothing erased.
Here all 10 attempts are drawn at once and the first valid one is kept: attempts are
independent and identically distributed, so the kept box has the distribution of the
sequential loop's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .transforms import SSL_ERASE_AREA

__all__ = ["IMAGE_KEYS", "ERASE_AREA", "ERASE_MIN_ASPECT", "ERASE_ATTEMPTS", "normalize_uint8", "erase_boxes",
           "random_erase", "erase_seed", "DeviceTransform"]

IMAGE_KEYS = ("img", "ssl_view1", "ssl_view2")   # the batch keys that hold images
ERASE_AREA = (0.02, 1 / 3)       # timm RandomErasing's default area range (the main training image)
ERASE_MIN_ASPECT = 0.3           # aspect ratios log-uniform in [0.3, 1 / 0.3]
ERASE_ATTEMPTS = 10


def normalize_uint8(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
                    ) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 ``(x / 255 - mean) / std`` per channel.

    The same operations as ``ToTensor`` (``float``, ``div(255)``) then ``Normalize``
    (``sub(mean)``, ``div(std)``), in float32, so the CPU result equals theirs bit for bit.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects uint8 images, got {x.dtype}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).div_(255).sub_(m).div_(s)


def erase_boxes(n: int, h: int, w: int, prob: float, area: tuple[float, float], generator: torch.Generator,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's erasing boxes for ``n`` images of h x w: (top, left, height, width), each (n,) int64
    on ``device``; an image left alone has height and width 0. Draws from ``generator`` (which
    lives on ``device``) in float64, as timm's Python arithmetic."""
    kw: dict[str, Any] = {"generator": generator, "device": device, "dtype": torch.float64}
    erase = torch.rand(n, **kw) <= prob                       # timm skips when random() > p
    lo, hi = float(area[0]), float(area[1])
    frac = lo + (hi - lo) * torch.rand(n, ERASE_ATTEMPTS, **kw)
    la, lb = math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT)
    ratio = torch.exp(la + (lb - la) * torch.rand(n, ERASE_ATTEMPTS, **kw))
    target = frac * (h * w)
    bh = torch.round(torch.sqrt(target * ratio)).long()
    bw = torch.round(torch.sqrt(target / ratio)).long()
    ok = (bw < w) & (bh < h)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first valid attempt (argmax: first maximum)
    erase &= ok.any(dim=1)
    bh = torch.where(erase, bh.gather(1, first).squeeze(1), 0)
    bw = torch.where(erase, bw.gather(1, first).squeeze(1), 0)
    # randint(0, h - bh) inclusive: floor(u * (h - bh + 1)), clamped against u rounding up to 1
    top = torch.minimum((torch.rand(n, **kw) * (h - bh + 1)).long(), h - bh)
    left = torch.minimum((torch.rand(n, **kw) * (w - bw + 1)).long(), w - bw)
    return top, left, bh, bw


def random_erase(x: torch.Tensor, prob: float, area: tuple[float, float], generator: torch.Generator,
                 dense: bool | None = None) -> torch.Tensor:
    """timm ``RandomErasing(probability=prob, min_area, max_area=area, mode='pixel', max_count=1)``
    applied to every image of the normalised float batch ``x`` (B, C, H, W), in place; returns ``x``.

    The erased pixels get N(0, 1) values from ``generator``. ``dense`` (the default off the CPU)
    draws a batch of noise and selects the boxes with a mask: a few batch-wide kernels, no host
    synchronisation. Otherwise (the CPU default, where drawing noise is the cost) each erased
    box is filled with just its own values, image by image, as timm does.
    """
    if prob <= 0:
        return x
    b, c, h, w = x.shape
    top, left, bh, bw = erase_boxes(b, h, w, prob, area, generator, x.device)
    if dense is None:
        dense = x.device.type != "cpu"
    if dense:
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])         # (B, H)
        in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])       # (B, W)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]             # (B, 1, H, W)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x.copy_(torch.where(mask, noise, x))
    for i, (t, lf, hh, ww) in enumerate(zip(top.tolist(), left.tolist(), bh.tolist(), bw.tolist())):
        if hh and ww:
            x[i, :, t:t + hh, lf:lf + ww] = torch.randn((c, hh, ww), generator=generator, device=x.device,
                                                        dtype=x.dtype)
    return x


def erase_seed(seed: int, epoch: int, rank: int) -> int:
    """The erasing generator's seed of an epoch: a function of (seed, epoch, rank) alone, so that a
    resumed run erases what an uninterrupted one does (kept apart from the loader's seeds)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(rank), 0x45524153]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


class DeviceTransform:
    """What a loader's uint8 batch needs on the device: every image key (:data:`IMAGE_KEYS`) made
    normalised float32; with ``erase_prob`` > 0, the keys of ``erase_areas`` randomly erased with
    their area range.

    The erasing generator lives on the batch's device and is seeded from (seed, epoch, rank) by
    :meth:`set_epoch` (:func:`processor.batches.set_loader_epoch` calls it with the loader's epoch).
    It is created at the first batch, and is not pickled with the dataset that carries this object.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], erase_prob: float = 0.0,
                 erase_areas: Mapping[str, tuple[float, float]] | None = None, seed: int = 0) -> None:
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.erase_prob = float(erase_prob)
        self.erase_areas = dict(erase_areas or {})
        self._seed = erase_seed(seed, 0, 0)
        self._gen: torch.Generator | None = None
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_cfg(cls, cfg: Any, is_train: bool) -> DeviceTransform:
        """Test: normalise only. Train: erase ``img`` with area [0.02, 1/3] and the SSL views with
        area :data:`SSL_ERASE_AREA` ([0.33, 1/3]), each with probability ``INPUT.RE_PROB``."""
        areas = {"img": ERASE_AREA, "ssl_view1": SSL_ERASE_AREA, "ssl_view2": SSL_ERASE_AREA} if is_train else {}
        return cls(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD, float(cfg.INPUT.RE_PROB) if is_train else 0.0,
                   areas, seed=int(cfg.SOLVER.SEED))

    def set_epoch(self, seed: int, epoch: int, rank: int = 0) -> None:
        """Erase epoch ``epoch`` with a generator seeded from (seed, epoch, rank)."""
        self._seed = erase_seed(seed, epoch, rank)
        self._gen = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The erasing generator on ``device`` (seeded at the first use after :meth:`set_epoch`)."""
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device).manual_seed(self._seed)
        return self._gen

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 tensors on ``device``, made once per device: a list turned into a
        CUDA tensor at every batch would be a host copy and a stream synchronisation each time."""
        stats = self._stats.get(device)
        if stats is None:
            stats = self._stats[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device),
                                           torch.tensor(self.std, dtype=torch.float32, device=device))
        return stats

    def image(self, x: torch.Tensor, key: str = "img") -> torch.Tensor:
        """One key's batch (B, 3, H, W) uint8 -> normalised float32 (erased when ``key`` is erased)."""
        out = normalize_uint8(x, *self.stats(x.device))
        area = self.erase_areas.get(key)
        if self.erase_prob > 0 and area is not None:
            random_erase(out, self.erase_prob, area, self.generator(out.device))
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with every uint8 image key finished (a new dict; other keys as they are)."""
        out = dict(batch)
        for key in IMAGE_KEYS:
            v = out.get(key)
            if torch.is_tensor(v) and v.dtype == torch.uint8:
                out[key] = self.image(v, key)
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_gen": None, "_stats": {}}

    def __repr__(self) -> str:
        return (f"DeviceTransform(mean={self.mean}, std={self.std}, erase_prob={self.erase_prob}, "
                f"erase_areas={self.erase_areas})")
