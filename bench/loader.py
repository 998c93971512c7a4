"""Bench: what ONE loader process delivers, today's per-image CPU pipeline vs the uint8 loaders.

A loader worker runs ``dataset[i]`` (decode + transforms) and the collate with one torch thread;
here that is a ``DataLoader`` with ``num_workers=0`` in this process, ``torch.set_num_threads(1)``.
Two pipelines, with the INPUT values of a config (default: the published ViT SVLL-ReID config,
256x128, padding 10, flip 0.5, erasing 0.5):

* **test** (evaluation and the stage-1 cache): before = ``Resize(bilinear) + ToTensor +
  Normalize``; after = the same resize to uint8 (``datasets.transforms.TestTransform``);
* **stage 2** (one sample = the image + two SSL views): before = three full train pipelines
  ``Resize(bicubic) + flip + Pad + RandomCrop + ToTensor + Normalize + RandomErasing`` (timm;
  fixed area 0.33 for the two SSL views); after = one resize, three flip/pad/crops to uint8
  (``TrainTransform.views``).

"Before" is built here from torchvision and timm explicitly (the ops of the loaders before the
split), with the old dataset item, so it stays what it was whatever the library becomes. Rounds
alternate before / after so that background load hits both alike; rates are medians. The device
half of "after" (``DeviceTransform``: /255, normalise, erasing of the three views) is timed
separately on ``--device`` per batch.

    .venv/bin/python bench/loader.py [--root data/synthetic] [--images 512] [--repeats 3] [--device cuda]

A second table times the resize alone on the same decoded images: Pillow's ``Image.resize``
(what the published pipeline calls) against ``datasets.resample.resize_rgb`` (what the loaders
call; the same pixels), for the test (bilinear) and train (bicubic) sizes, with the floor of a
plain copy of the output into the tensor layout.

Without ``--root`` the synthetic set (``tools/make_synthetic.py``'s defaults: 128x64 JPEG) is
written to a temporary folder. ``loader_rates(...)`` returns the rows for other benchmarks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset

from config import load_config
from datasets import build_dataset
from datasets.bases import ImageDataset
from datasets.device_transforms import DeviceTransform
from datasets.resample import resize_rgb, warm_up
from datasets.synthetic import SyntheticSpec, generate_synthetic
from datasets.transforms import build_loader_transform
from utils.images import read_image

from _measure import timed_round_robin  # bench/, the script's folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "person", "vit_svllreid.yml")
SSL_AREA = 0.33


# ----------------------------------------------------------------------------- before: today's CPU pipeline
def before_test_transform(cfg: Any) -> T.Compose:
    """The test transform as the loaders ran it before the split: resize (bilinear), ToTensor, Normalize."""
    return T.Compose([T.Resize([int(v) for v in cfg.INPUT.SIZE_TEST], interpolation=T.InterpolationMode.BILINEAR),
                      T.ToTensor(), T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD)])


def before_train_transform(cfg: Any, ssl: bool) -> T.Compose:
    """The train (``ssl``: SSL view) transform as the loaders ran it before the split."""
    size = [int(v) for v in cfg.INPUT.SIZE_TRAIN]
    area = {"min_area": SSL_AREA, "max_area": SSL_AREA} if ssl else {}
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(p=cfg.INPUT.PROB),
        T.Pad(cfg.INPUT.PADDING), T.RandomCrop(size), T.ToTensor(),
        T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD),
        RandomErasing(probability=cfg.INPUT.RE_PROB, mode="pixel", max_count=1, device="cpu", **area)])


class BeforeDataset(Dataset):
    """The dataset item before the split: every view a full per-image pipeline, float32."""

    def __init__(self, samples: Sequence[tuple], transform: Callable, ssl_transform: Callable | None = None) -> None:
        self.samples, self.transform, self.ssl_transform = list(samples), transform, ssl_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, pid, camid, viewid = self.samples[index]
        img = read_image(path)
        item = {"img": self.transform(img), "pid": pid, "camid": camid, "viewid": viewid}
        if self.ssl_transform is not None:
            item["ssl_view1"] = self.ssl_transform(img)
            item["ssl_view2"] = self.ssl_transform(img)
        return item


# ----------------------------------------------------------------------------- measuring
def _one_pass(dataset: Dataset, batch: int) -> float:
    """Seconds to iterate ``dataset`` once as one loader process does (decode, transforms, collate)."""
    start = time.perf_counter()
    for _ in DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0):
        pass
    return time.perf_counter() - start


def _device_ms(transform: DeviceTransform, keys: Sequence[str], shape: Sequence[int], device: torch.device,
               repeats: int) -> float:
    """Median milliseconds of ``transform`` on one uint8 batch of ``shape`` per key, already on ``device``."""
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randint(0, 256, tuple(shape), generator=g, dtype=torch.uint8).to(device) for k in keys}
    times = []
    for _ in range(repeats + 1):          # the first call warms up (generator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        transform(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def synthetic_root(out: str) -> str:
    """The synthetic set of ``tools/make_synthetic.py`` (defaults) under ``out``."""
    generate_synthetic(out, SyntheticSpec())
    return out


def loader_rates(root: str | None = None, config: str = DEFAULT_CONFIG, images: int = 512, batch: int = 64,
                 repeats: int = 3, device: str | torch.device | None = None,
                 opts: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per pipeline ('test', 'stage2'): one loader process's rate before and after the split, and the
    device half's cost. ``root``: a ``folder`` dataset (None: the synthetic set in a temporary
    folder); ``images``: training images iterated per pass; ``opts``: config overrides.

    Each row: ``pipeline``, ``unit`` ('images' or 'samples (3 views)'), ``before_per_s``,
    ``after_per_s``, ``speedup`` (after / before), ``cpu_ms_before`` and ``cpu_ms_after`` (per
    unit, one core), ``device``, ``device_ms_per_batch`` and ``device_ms_per_unit`` (the device
    half of 'after'), ``batch``, ``images``, ``repeats``.
    """
    if root is None:
        with tempfile.TemporaryDirectory() as tmp:
            return loader_rates(synthetic_root(tmp), config, images, batch, repeats, device, opts)
    cfg = load_config(config, ["DATASETS.NAMES", "folder", "DATASETS.ROOT_DIR", root, *opts])
    train = build_dataset("folder", root).train
    samples = (train * (images // len(train) + 1))[:images]
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    contenders = {
        "test": (BeforeDataset(samples, before_test_transform(cfg)),
                 ImageDataset(samples, build_loader_transform(cfg, False)),
                 DeviceTransform.from_cfg(cfg, is_train=False), ("img",), cfg.INPUT.SIZE_TEST, "images"),
        "stage2": (BeforeDataset(samples, before_train_transform(cfg, False), before_train_transform(cfg, True)),
                   ImageDataset(samples, build_loader_transform(cfg, True), ssl_views=True),
                   DeviceTransform.from_cfg(cfg, is_train=True), ("img", "ssl_view1", "ssl_view2"),
                   cfg.INPUT.SIZE_TRAIN, "samples (3 views)"),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # as in a loader worker
    try:
        torch.manual_seed(0)
        for before, after, *_ in contenders.values():      # warm-up: file cache, first calls
            _one_pass(before, batch)
            _one_pass(after, batch)
        times: dict[str, dict[str, list[float]]] = {k: {"before": [], "after": []} for k in contenders}
        for _ in range(repeats):
            for name, (before, after, *_) in contenders.items():
                times[name]["before"].append(_one_pass(before, batch))
                times[name]["after"].append(_one_pass(after, batch))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for name, (_, _, transform, keys, size, unit) in contenders.items():
        t_before, t_after = statistics.median(times[name]["before"]), statistics.median(times[name]["after"])
        dev_ms = _device_ms(transform, keys, (batch, 3, *[int(v) for v in size]), dev, max(repeats, 5))
        rows.append({"pipeline": name, "unit": unit, "before_per_s": images / t_before,
                     "after_per_s": images / t_after, "speedup": t_before / t_after,
                     "cpu_ms_before": 1000 * t_before / images, "cpu_ms_after": 1000 * t_after / images,
                     "device": str(dev), "device_ms_per_batch": dev_ms, "device_ms_per_unit": dev_ms / batch,
                     "batch": batch, "images": images, "repeats": repeats})
    return rows


def _resize_contenders(pil_images: Sequence[Image.Image], arrays: Sequence[np.ndarray], h: int, w: int,
                       filt: str) -> dict[str, Callable[[], list]]:
    """Pillow's resize, ``resize_rgb`` and the floor (a copy into the (3, h, w) layout) over all images."""
    pil_filter = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[filt]
    out = np.zeros((h, w, 3), np.uint8)
    return {
        "pillow": lambda: [np.asarray(im.resize((w, h), pil_filter)) for im in pil_images],
        "resize_rgb": lambda: [resize_rgb(a, (h, w), filt) for a in arrays],
        "floor": lambda: [np.ascontiguousarray(out.transpose(2, 0, 1)) for _ in arrays],
    }


def resize_rates(root: str, config: str = DEFAULT_CONFIG, images: int = 256, repeats: int = 5) -> list[dict[str, Any]]:
    """Milliseconds per image of the resize alone, Pillow against ``resize_rgb``, on ``images`` decoded
    training images of the folder set ``root``; one thread, medians of ``repeats`` alternating rounds.
    The floor is the copy of an output-sized (H, W, 3) array into the (3, H, W) layout."""
    cfg = load_config(config, ["DATASETS.NAMES", "folder", "DATASETS.ROOT_DIR", root])
    train = build_dataset("folder", root).train
    arrays = [np.asarray(read_image(p)) for p, *_ in (train * (images // len(train) + 1))[:images]]
    pil_images = [Image.fromarray(a) for a in arrays]
    warm_up()
    rows = []
    for name, size, filt in (("test", cfg.INPUT.SIZE_TEST, "bilinear"), ("train", cfg.INPUT.SIZE_TRAIN, "bicubic")):
        h, w = (int(v) for v in size)
        contenders = _resize_contenders(pil_images, arrays, h, w, filt)
        times = timed_round_robin(contenders, 0, repeats)
        ms = {k: 1000 * statistics.median(v) / len(arrays) for k, v in times.items()}
        src = sorted({a.shape[:2] for a in arrays})
        rows.append({"resize": name, "filter": filt, "from": src[0] if len(src) == 1 else f"{len(src)} sizes",
                     "to": (h, w), **{f"{k}_ms": v for k, v in ms.items()},
                     "speedup": ms["pillow"] / ms["resize_rgb"]})
    return rows


def resize_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The resize rows as a markdown table."""
    lines = ["| resize | filter | from -> to | Pillow ms | resize_rgb ms | Pillow / resize_rgb | floor (copy) ms |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['resize']} | {r['filter']} | {r['from']} -> {r['to']} | {r['pillow_ms']:.3f} "
                     f"| {r['resize_rgb_ms']:.3f} | {r['speedup']:.2f}x | {r['floor_ms']:.3f} |")
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| pipeline | unit | before /s | after /s | CPU ms per unit before -> after | after / before "
             "| device half (ms per batch) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['unit']} | {r['before_per_s']:.0f} | {r['after_per_s']:.0f} "
                     f"| {r['cpu_ms_before']:.2f} -> {r['cpu_ms_after']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['device_ms_per_batch']:.2f} ({r['device']}, batch {r['batch']}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="a folder dataset (default: the synthetic set, written to a temp dir)")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="config whose INPUT values are used")
    ap.add_argument("--images", type=int, default=512, help="training images per pass")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="device of the device half (default: cuda if available)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or synthetic_root(tmp)
        rows = loader_rates(root, args.config, args.images, args.batch, args.repeats, args.device)
        print(f"One loader process (num_workers=0, 1 torch thread), {args.images} images per pass, median of "
              f"{args.repeats}; {os.cpu_count()} CPU(s), torch {torch.__version__}")
        print(markdown(rows))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            resized = resize_rates(root, args.config, min(args.images, 256), max(args.repeats, 5))
        finally:
            torch.set_num_threads(threads)
        print("\nThe resize alone, per image (decoded images in memory, one thread, median of "
              f"{max(args.repeats, 5)} alternating rounds):")
        print(resize_markdown(resized))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
