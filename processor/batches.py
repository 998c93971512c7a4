"""Batches and loaders: moving a batch to the device (where its uint8 images become normalised
float), per-epoch loader seeding, a rank's shard, and encoding a whole loader in eval mode."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from datasets.device_transforms import DeviceTransform
from datasets.sampler import epoch_seed
from utils.checkpoint import unwrap
from utils.dist import gather_strided, get_rank, get_world_size, shard_indices

from .amp import autocast
from .progress import progress

__all__ = ["to_device", "host_to_device", "device_transform_of", "sharded_loader", "set_loader_epoch", "eval_mode",
           "encode_loader"]


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a stream synchronisation (pinned, then non-blocking)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def device_transform_of(loader: DataLoader | Dataset) -> DeviceTransform | None:
    """The device half of ``loader``'s image pipeline (its dataset's ``device_transform``, looking
    through ``Subset``); None when its items are final."""
    ds = loader.dataset if isinstance(loader, DataLoader) else loader
    while isinstance(ds, Subset):
        ds = ds.dataset
    return getattr(ds, "device_transform", None)


def to_device(batch: dict[str, Any], device: torch.device,
              transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Move the tensors of a batch dict to ``device`` (non-blocking), then apply ``transform``
    there: the loader's :func:`device_transform_of`, which makes the uint8 images normalised
    float (and erases the training views). Every batch of a loader reaches the device here."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return transform(moved) if transform is not None else moved


def sharded_loader(loader: DataLoader) -> DataLoader:
    """The same loader over this rank's strided share of the dataset (itself when single-process);
    made once per loader, so that persistent workers persist."""
    if get_world_size() == 1:
        return loader
    shard = getattr(loader, "_rank_shard", None)
    if shard is None:
        shard = DataLoader(Subset(loader.dataset, shard_indices(len(loader.dataset))), batch_size=loader.batch_size,
                           shuffle=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                           pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers,
                           prefetch_factor=loader.prefetch_factor if loader.num_workers else None)
        loader._rank_shard = shard
    return shard


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch`` of ``loader`` a function of (seed, epoch, rank) alone.

    The sampler draws its order from (seed, epoch); the loader's generator, which seeds
    the workers' augmentation RNGs, is re-seeded too, and so is the device-side erasing
    (:meth:`datasets.device_transforms.DeviceTransform.set_epoch`). With that, resuming at any
    epoch reproduces the same batches and augmentations as an uninterrupted run.
    """
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch) + get_rank())
    transform = device_transform_of(loader)
    if transform is not None and hasattr(transform, "set_epoch"):
        transform.set_epoch(seed, epoch, get_rank())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped model in eval mode (no DDP collectives), its previous mode restored after."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def encode_loader(model: nn.Module, loader: DataLoader, device: torch.device,
                  encode: Callable[[nn.Module, dict[str, Any]], torch.Tensor], desc: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, pids, camids) of every sample of ``loader``, in dataset order, eval mode, no grad.

    ``encode(net, batch)`` gives a batch's features. Under DDP each rank encodes a strided
    shard and every rank receives the whole set.
    """
    feats, pids, camids = [], [], []
    transform = device_transform_of(loader)
    with eval_mode(model) as net:
        for batch in progress(sharded_loader(loader), None, desc):
            batch = to_device(batch, device, transform)
            with autocast(device):
                feats.append(encode(net, batch).float())
            pids.append(batch["pid"])
            camids.append(batch["camid"])
    n = len(loader.dataset)
    return tuple(gather_strided(torch.cat(x), n) for x in (feats, pids, camids))
