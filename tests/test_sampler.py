"""RandomIdentitySampler / RandomIdentitySamplerDDP / ShuffleSampler invariants."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datasets import RandomIdentitySampler, RandomIdentitySamplerDDP, ShuffleSampler

K, P = 4, 4
BATCH = P * K


def make_source(n_ids: int = 30, seed: int = 0) -> list[tuple[str, int, int, int]]:
    """Identities with 1..11 images each, interleaved in the list."""
    rng = np.random.default_rng(seed)
    samples = [(f"img{pid}_{k}.jpg", pid * 7 + 3, 0, 0)
               for pid in range(n_ids) for k in range(int(rng.integers(1, 12)))]
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]


def chunk(indices: list[int], size: int) -> list[list[int]]:
    assert len(indices) % size == 0
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def test_batches_hold_p_identities_by_k_images():
    src = make_source()
    sampler = RandomIdentitySampler(src, BATCH, K, seed=1)
    batches = chunk(list(sampler), BATCH)
    assert batches
    for b in batches:
        pids = [src[i][1] for i in b]
        counts = Counter(pids)
        assert len(counts) == P and set(counts.values()) == {K}
        # identity groups are contiguous blocks of K
        assert all(len(set(pids[j:j + K])) == 1 for j in range(0, BATCH, K))


def test_identity_coverage_invariant():
    """Exact invariant of the published algorithm, per epoch.

    With c(pid) = max(n, K) // K chunks, every identity appears in at most c(pid)
    batches; the identities that appear in fewer (still holding chunks when the loop
    stops) are fewer than P; all others appear in exactly c(pid) batches. Identities
    with at least K images never repeat an image within the epoch.
    """
    src = make_source()
    by_pid: dict[int, list[int]] = {}
    for i, s in enumerate(src):
        by_pid.setdefault(s[1], []).append(i)
    for epoch in range(5):
        sampler = RandomIdentitySampler(src, BATCH, K, seed=7)
        sampler.set_epoch(epoch)
        idx = list(sampler)
        assert len(idx) <= len(sampler)
        appear = Counter()
        for b in chunk(idx, BATCH):
            for pid in {src[i][1] for i in b}:
                appear[pid] += 1
        leftover = []
        for pid, members in by_pid.items():
            chunks = max(len(members), K) // K
            assert appear[pid] <= chunks
            if appear[pid] < chunks:
                leftover.append(pid)
            used = [i for i in idx if src[i][1] == pid]
            assert set(used) <= set(members)
            if len(members) >= K:
                assert len(used) == len(set(used))
        assert len(leftover) <= P - 1


def test_len_is_published_estimate():
    src = make_source()
    sizes = Counter(s[1] for s in src)
    expected = sum(max(n, K) - max(n, K) % K for n in sizes.values())
    assert len(RandomIdentitySampler(src, BATCH, K)) == expected


def test_epochs_reproducible_and_distinct():
    src = make_source()
    a = RandomIdentitySampler(src, BATCH, K, seed=5)
    b = RandomIdentitySampler(src, BATCH, K, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b)
    a.set_epoch(3)
    assert list(a) == first          # resumable: epoch 3 again gives epoch 3
    a.set_epoch(4)
    assert list(a) != first
    c = RandomIdentitySampler(src, BATCH, K, seed=6)
    c.set_epoch(3)
    assert list(c) != first


def test_epoch_advances_without_set_epoch():
    src = make_source()
    s = RandomIdentitySampler(src, BATCH, K, seed=2)
    e0, e1 = list(s), list(s)
    assert e0 != e1
    s.set_epoch(1)
    assert list(s) == e1


def test_sampler_does_not_touch_global_rng():
    import random
    random.seed(0)
    np.random.seed(0)
    expected = (random.random(), np.random.rand())
    random.seed(0)
    np.random.seed(0)
    list(RandomIdentitySampler(make_source(), BATCH, K, seed=0))
    assert (random.random(), np.random.rand()) == expected


def test_few_images_sampled_with_replacement():
    src = [("a", 1, 0, 0), ("b", 2, 0, 0), ("c", 2, 0, 0), ("d", 3, 0, 0), ("e", 4, 0, 0)]
    idx = list(RandomIdentitySampler(src, 8, 4, seed=0))  # P = 2, one chunk per identity
    assert len(idx) == 16  # 4 identities -> exactly 2 batches, nothing left over
    groups = chunk(idx, 4)
    assert sorted(src[g[0]][1] for g in groups) == [1, 2, 3, 4]
    for g in groups:
        assert len({src[i][1] for i in g}) == 1
    assert [g for g in groups if src[g[0]][1] == 1] == [[0, 0, 0, 0]]
    assert set(sum((g for g in groups if src[g[0]][1] == 2), [])) <= {1, 2}


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_shards_partition_the_global_batches(world):
    src = make_source()
    single = RandomIdentitySampler(src, BATCH, K, seed=11)
    single.set_epoch(2)
    global_batches = chunk(list(single), BATCH)
    shards = []
    for rank in range(world):
        s = RandomIdentitySamplerDDP(src, BATCH, K, rank=rank, world_size=world, seed=11)
        s.set_epoch(2)
        shards.append(chunk(list(s), BATCH // world))
        assert len(s) == len(single) // world
    for i, gb in enumerate(global_batches):
        parts = [shards[r][i] for r in range(world)]
        assert sum(parts, []) == gb
        sets = [set(p) for p in parts]
        assert all(not (sets[a] & sets[b]) for a in range(world) for b in range(a + 1, world))
        for p in parts:  # every rank gets whole identity groups
            assert set(Counter(src[j][1] for j in p).values()) == {K}


def test_ddp_rejects_indivisible_identities():
    with pytest.raises(ValueError, match="divisible"):
        RandomIdentitySamplerDDP(make_source(), 12, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="multiple"):
        RandomIdentitySampler(make_source(), 10, 4)


def test_shuffle_sampler():
    s = ShuffleSampler(50, seed=3)
    s.set_epoch(0)
    a = list(s)
    assert sorted(a) == list(range(50)) and a != list(range(50))
    s.set_epoch(0)
    assert list(s) == a
    s.set_epoch(1)
    assert list(s) != a
