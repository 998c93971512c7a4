"""Identity-balanced samplers (P identities x K instances per batch) and a seeded shuffler.

All samplers draw from their own RNG seeded from ``(seed, epoch)`` -- never the global
one -- so an epoch's order is reproducible and training can resume mid-run. Call
``set_epoch(e)`` before iterating epoch ``e``; without it the epoch advances by one
after every full iteration.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler", "RandomIdentitySamplerDDP", "ShuffleSampler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixing ``seed`` and ``epoch`` (no collisions between nearby pairs)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class _EpochMixin:
    seed: int
    epoch: int
    _epoch_set: bool

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order for the next iteration."""
        self.epoch = int(epoch)
        self._epoch_set = True

    def _begin_epoch(self) -> int:
        """Epoch to draw now; advances automatically when set_epoch was not called."""
        if not self._epoch_set:
            self.epoch += 1 if getattr(self, "_iterated", False) else 0
        self._iterated, self._epoch_set = True, False
        return self.epoch


class RandomIdentitySampler(_EpochMixin, Sampler[int]):
    """Batches of ``P = batch_size // num_instances`` identities x ``K = num_instances`` images.

    The published algorithm (TransReID / CLIP-ReID): every identity's indices (drawn
    with replacement up to K when it has fewer than K) are shuffled and cut into chunks
    of K (a trailing partial chunk is dropped); then P random identities still holding
    chunks each give one chunk, an identity leaves the pool when it runs out, and the
    epoch ends when fewer than P identities remain. The yielded indices are a multiple
    of ``batch_size`` long, one batch after another.

    ``len()`` is the published estimate ``sum over pids of max(n, K) - max(n, K) % K``
    (an upper bound: the chunks of at most P-1 identities are left over).

    Args:
        data_source: samples ``(path, pid, camid, viewid)`` (or an object whose
            ``samples`` attribute holds them); only the pid is used.
    """

    def __init__(self, data_source: Sequence[Sequence[Any]] | Any, batch_size: int,
                 num_instances: int, seed: int = 0) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                             f"num_instances ({num_instances})")
        samples = getattr(data_source, "samples", data_source)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed = int(seed)
        self.epoch, self._epoch_set = 0, False
        self.index_dic: dict[int, list[int]] = defaultdict(list)
        for index, sample in enumerate(samples):
            self.index_dic[int(sample[1])].append(index)
        self.pids = list(self.index_dic)
        k = num_instances
        self.length = sum(max(len(v), k) - max(len(v), k) % k for v in self.index_dic.values())

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (lists of ``P*K`` indices, identity by identity)."""
        rng = random.Random(epoch_seed(self.seed, epoch))
        k, p = self.num_instances, self.num_pids_per_batch
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = list(self.index_dic[pid])
            if len(idxs) < k:
                idxs = rng.choices(idxs, k=k)
            rng.shuffle(idxs)
            chunks[pid] = [idxs[i:i + k] for i in range(0, len(idxs) - k + 1, k)]
        available = list(self.pids)
        batches = []
        while len(available) >= p:
            batch = []
            for pid in rng.sample(available, p):
                batch.extend(chunks[pid].pop(0))
                if not chunks[pid]:
                    available.remove(pid)
            batches.append(batch)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches for ``epoch``."""
        return self.global_batches(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch = self._begin_epoch()
        return iter([i for batch in self.batches(epoch) for i in batch])

    def __len__(self) -> int:
        return self.length


class RandomIdentitySamplerDDP(RandomIdentitySampler):
    """Distributed :class:`RandomIdentitySampler`: ranks share the same global batches.

    Every rank draws the same global batches (same ``seed`` and epoch) and takes a
    contiguous block of identity groups from each: rank ``r`` gets identities
    ``[r*P/W, (r+1)*P/W)`` of every global batch, i.e. ``batch_size / W`` images. The
    shards of all ranks are disjoint and, concatenated in rank order, equal the
    single-process batches. ``P`` must be divisible by the world size ``W``.

    Args:
        batch_size: the global batch (all ranks together).
        rank, world_size: default to the current process group (0 and 1 without one).
    """

    def __init__(self, data_source: Sequence[Sequence[Any]] | Any, batch_size: int,
                 num_instances: int, rank: int | None = None, world_size: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(data_source, batch_size, num_instances, seed)
        if rank is None or world_size is None:
            from utils.dist import get_rank, get_world_size
            rank = get_rank() if rank is None else rank
            world_size = get_world_size() if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if self.num_pids_per_batch % world_size:
            raise ValueError(f"identities per batch ({self.num_pids_per_batch} = {batch_size} // "
                             f"{num_instances}) must be divisible by the world size ({world_size})")
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size

    def batches(self, epoch: int) -> list[list[int]]:
        lo = self.rank * self.local_batch_size
        return [b[lo:lo + self.local_batch_size] for b in self.global_batches(epoch)]

    def __len__(self) -> int:
        return self.length // self.world_size


class ShuffleSampler(_EpochMixin, Sampler[int]):
    """A permutation of ``range(num_samples)`` drawn from ``(seed, epoch)``."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = int(seed)
        self.epoch, self._epoch_set = 0, False

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self._begin_epoch()))
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples
