"""``make_dataloader(cfg)``: the stage-2 train, stage-1 feature and validation loaders.

Batches are dicts of tensors:
- stage 2: ``img`` (B,3,H,W) uint8, ``pid``/``camid``/``viewid`` int64, plus
  ``ssl_view1``/``ssl_view2`` (same shape as ``img``) when ``MODEL.USE_SSL``;
- stage 1: the same keys without SSL views, test transforms, every training image once
  in dataset order;
- validation: query images, then gallery images, test transforms, plus ``path`` (list).

Images are uint8 (decoding and geometry run in the workers); each loader's dataset carries the
``DeviceTransform`` that makes them normalised float (and erases the training views) on the
device, which ``processor.batches.to_device`` applies. The stage-2 sampler is
``train_loader.sampler`` (``processor.batches.set_loader_epoch`` seeds it, the workers and the
erasing each epoch).
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from utils.dist import get_rank, get_world_size, is_dist
from utils.misc import resolve_num_workers

from .bases import BaseImageDataset, DatasetError, ImageDataset, train_test_overlap, verify_images
from .device_transforms import DeviceTransform
from .factory import build_dataset
from .sampler import RandomIdentitySampler, RandomIdentitySamplerDDP, ShuffleSampler
from .transforms import build_loader_transform

__all__ = ["Loaders", "make_dataloader", "make_val_loader", "build_dataset_from_cfg",
           "warn_train_identities_in_test"]

logger = logging.getLogger("svllreid")


def build_dataset_from_cfg(cfg: Any, trial: int = 0, test_only: bool = False) -> BaseImageDataset:
    """The dataset named by ``DATASETS.NAMES`` under ``DATASETS.ROOT_DIR``.

    VehicleID uses ``DATASETS.VEHICLEID_TEST_SIZE`` and the split of ``trial`` drawn from
    ``SOLVER.SEED``; VeRi requires view labels when ``MODEL.SIE_VIEW`` is on. Splits that differ
    from the benchmark's published statistics are a warning, an error with ``DATASETS.STRICT_STATS``.
    ``test_only``: query and gallery only (evaluation); the training split need not exist.
    """
    kwargs: dict[str, Any] = {"need_views": bool(cfg.MODEL.SIE_VIEW), "test_only": test_only,
                              "strict_stats": bool(cfg.DATASETS.STRICT_STATS)}
    if cfg.DATASETS.NAMES == "VehicleID":
        kwargs.update(test_size=cfg.DATASETS.VEHICLEID_TEST_SIZE, trial=trial,
                      seed=cfg.SOLVER.SEED)
    return build_dataset(cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR, **kwargs)


PREFETCH_FACTOR = 4   # batches each worker keeps ready (uint8 batches: a quarter of float ones)


def _loader_kwargs(cfg: Any, seed_offset: int, persistent: bool = False) -> dict[str, Any]:
    """Workers (DATALOADER.NUM_WORKERS, -1: from the cores), pinned memory when the run uses CUDA, a
    seeded generator (worker RNGs derive from it), prefetching; ``persistent`` keeps the workers
    between iterations (only for loaders without random transforms)."""
    workers = resolve_num_workers(cfg.DATALOADER.NUM_WORKERS)
    seed = int(cfg.SOLVER.SEED) + 1000 * get_rank() + seed_offset
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        # the training loader is not persistent: each epoch's workers are seeded afresh from the loader's
        # generator, which the trainer re-seeds per epoch (exact resume, see processor.batches.set_loader_epoch)
        "persistent_workers": persistent and workers > 0,
        # pinned batches copy to the GPU asynchronously; a run on the CPU has no use for them
        "pin_memory": str(cfg.MODEL.DEVICE) != "cpu" and torch.cuda.is_available(),
        "generator": torch.Generator().manual_seed(seed),
    }
    if workers > 0:
        kwargs["prefetch_factor"] = PREFETCH_FACTOR
    return kwargs


def check_identity_batch(cfg: Any, num_pids: int) -> None:
    """Refuse a P x K batch that needs more identities than the training set has.

    The identity sampler ends an epoch when fewer than P identities are left, so with
    P > #identities it yields no batch at all and stage 2 would silently train nothing.
    """
    if "triplet" not in cfg.DATALOADER.SAMPLER:
        return
    batch, k = int(cfg.SOLVER.STAGE2.IMS_PER_BATCH), int(cfg.DATALOADER.NUM_INSTANCE)
    if batch // k > num_pids:
        raise DatasetError(
            f"SOLVER.STAGE2.IMS_PER_BATCH = {batch} / DATALOADER.NUM_INSTANCE = {k} needs {batch // k} identities "
            f"per batch, but {cfg.DATASETS.NAMES} has {num_pids} training identities: use IMS_PER_BATCH <= "
            f"{num_pids * k} (or a smaller NUM_INSTANCE)")


def _train_sampler(cfg: Any, train: list) -> tuple[Sampler[int], int, bool]:
    """(sampler, per-process batch size, drop_last) for stage 2."""
    batch = int(cfg.SOLVER.STAGE2.IMS_PER_BATCH)
    seed = int(cfg.SOLVER.SEED)
    distributed = bool(cfg.MODEL.DIST_TRAIN) and is_dist()
    if bool(cfg.MODEL.DIST_TRAIN) and not distributed:
        logger.warning("MODEL.DIST_TRAIN is set but no process group is initialised; "
                       "using the single-process sampler")
    if "triplet" in cfg.DATALOADER.SAMPLER:
        k = int(cfg.DATALOADER.NUM_INSTANCE)
        if distributed:
            world = get_world_size()
            return (RandomIdentitySamplerDDP(train, batch, k, get_rank(), world, seed),
                    batch // world, False)
        return RandomIdentitySampler(train, batch, k, seed), batch, False
    # 'softmax': plain shuffling; drop a trailing partial batch (a batch of one breaks BN)
    drop_last = len(train) > batch
    if distributed:
        world = get_world_size()
        return (DistributedSampler(train, world, get_rank(), shuffle=True, seed=seed),
                batch // world, drop_last)
    return ShuffleSampler(len(train), seed), batch, drop_last


def check_valid_queries(dataset: BaseImageDataset) -> None:
    """Refuse a test split where no query can be evaluated.

    The protocol ignores gallery images of the query's identity taken by the query's
    camera, so a query counts only when its identity appears in the gallery under another
    camera. With data from one camera (e.g. one's own recordings) no query counts.
    """
    cams_of: dict[int, set[int]] = {}
    for _, pid, cam, _ in dataset.gallery:
        cams_of.setdefault(pid, set()).add(cam)
    if not any(cams_of.get(pid, set()) - {cam} for _, pid, cam, _ in dataset.query):
        raise DatasetError(
            f"{dataset.name}: no query can be evaluated — none has a gallery image of its identity from another "
            "camera (gallery images of the query's identity and camera are ignored by the ReID protocol); "
            "query and gallery need the same identities seen by different cameras (the cC part of the name)")


def make_val_loader(cfg: Any, dataset: BaseImageDataset) -> tuple[DataLoader, int]:
    """(loader over query + gallery, number of query images)."""
    check_valid_queries(dataset)
    val_set = ImageDataset(dataset.query + dataset.gallery, build_loader_transform(cfg, False),
                           with_path=True, read_retries=cfg.DATALOADER.READ_RETRIES,
                           device_transform=DeviceTransform.from_cfg(cfg, is_train=False))
    # persistent: evaluated every EVAL_PERIOD epochs, deterministic (the workers' seeds do not matter)
    loader = DataLoader(val_set, batch_size=cfg.TEST.IMS_PER_BATCH, shuffle=False,
                        **_loader_kwargs(cfg, seed_offset=2, persistent=True))
    return loader, len(dataset.query)


class Loaders(NamedTuple):
    """What ``make_dataloader`` builds; unpacks in the published return order too."""
    train_stage2: DataLoader      # P x K identity batches with train (and SSL) transforms
    train_stage1: DataLoader      # every training image once, test transforms (stage-1 feature cache)
    val: DataLoader               # query images, then gallery images
    num_query: int
    num_classes: int              # training identities
    camera_num: int
    view_num: int


def warn_train_identities_in_test(dataset: BaseImageDataset, train_pids: Any, where: str) -> int:
    """One WARNING line when query/gallery hold training identities (``train_pids``, from
    ``where``): the test split then measures memorised identities. Returns the count."""
    n = train_test_overlap(train_pids, dataset)
    if n:
        logger.warning("%s: %d query/gallery identities are training identities of %s (distractors and junk not "
                       "counted): the test split is not disjoint from training, the metrics are optimistic",
                       dataset.name, n, where)
    return n


def make_dataloader(cfg: Any, trial: int = 0, dataset: BaseImageDataset | None = None) -> Loaders:
    """Build the loaders from ``cfg``; ``trial`` selects the VehicleID split. ``dataset``: the
    parsed dataset when the caller already has it (else built from ``cfg``)."""
    if dataset is None:
        dataset = build_dataset_from_cfg(cfg, trial)
    check_identity_batch(cfg, dataset.num_train_pids)
    warn_train_identities_in_test(dataset, dataset.train_pids, "its own training split")
    for subset in ("train", "query", "gallery"):
        verify_images([s[0] for s in getattr(dataset, subset)], f"{cfg.DATASETS.NAMES} {subset}")
    retries = cfg.DATALOADER.READ_RETRIES
    train_set = ImageDataset(dataset.train, build_loader_transform(cfg, True), ssl_views=bool(cfg.MODEL.USE_SSL),
                             read_retries=retries, device_transform=DeviceTransform.from_cfg(cfg, is_train=True))
    sampler, batch, drop_last = _train_sampler(cfg, dataset.train)
    train_loader_stage2 = DataLoader(train_set, batch_size=batch, sampler=sampler,
                                     drop_last=drop_last, **_loader_kwargs(cfg, seed_offset=0))
    train_set_normal = ImageDataset(dataset.train, build_loader_transform(cfg, False), read_retries=retries,
                                    device_transform=DeviceTransform.from_cfg(cfg, is_train=False))
    train_loader_stage1 = DataLoader(train_set_normal, batch_size=cfg.SOLVER.STAGE1.IMS_PER_BATCH,
                                     shuffle=False, **_loader_kwargs(cfg, seed_offset=1))
    val_loader, num_query = make_val_loader(cfg, dataset)
    return Loaders(train_loader_stage2, train_loader_stage1, val_loader, num_query,
                   dataset.num_train_pids, dataset.num_train_cams, dataset.num_train_vids)
