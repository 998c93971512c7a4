"""utils.reranking.re_ranking against the published loop algorithm computed in float32 (exact
reference); the float16 as-published reference is checked in test_published_reference.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reference.evaluation import exact_re_ranking
from utils import reranking
from utils.reranking import re_ranking


def loop_re_ranking(qf: torch.Tensor, gf: torch.Tensor, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """The published k-reciprocal re-ranking, dense and loop by loop, V and jaccard in float32."""
    return exact_re_ranking(qf.float(), gf.float(), k1, k2, lambda_value)


def clustered(seed: int, nq: int, ng: int, dim: int = 16, n_ids: int = 12, noise: float = 0.7):
    """Query/gallery features around shared identity centres (so re-ranking has structure)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, dim, generator=g)
    q = centres[torch.randint(0, n_ids, (nq,), generator=g)] + noise * torch.randn(nq, dim, generator=g)
    x = centres[torch.randint(0, n_ids, (ng,), generator=g)] + noise * torch.randn(ng, dim, generator=g)
    return q, x


def assert_matches_reference(qf, gf, k1, k2, lam, **kw):
    ours = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam, **kw)
    ref = loop_re_ranking(qf, gf, k1, k2, lam)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.argsort(ours.numpy(), axis=1, kind="stable"),
                                  np.argsort(ref, axis=1, kind="stable"))
    return ours, ref


@pytest.mark.parametrize("seed,nq,ng,k1,k2,lam,block", [
    (0, 10, 50, 20, 6, 0.3, 2048),    # published defaults
    (1, 23, 97, 20, 6, 0.3, 16),      # many blocks, block edge inside the query range
    (2, 40, 120, 7, 3, 0.5, 33),      # odd k1 (k1/2 = 3.5 -> 4), odd block size
    (3, 15, 70, 5, 1, 0.3, 32),       # k2 = 1: no query expansion; k1/2 = 2.5 -> 2 (banker's)
    (4, 8, 40, 45, 15, 0.1, 8),       # k1 close to N (= 48)
    (5, 6, 30, 60, 40, 0.8, 2048),    # k1 and k2 larger than N
    (6, 30, 30, 1, 2, 0.3, 7),        # tiny k1
])
def test_matches_published_loop(seed, nq, ng, k1, k2, lam, block):
    qf, gf = clustered(seed, nq, ng)
    assert_matches_reference(qf, gf, k1, k2, lam, block_size=block)


@pytest.mark.slow
def test_small_work_budgets_give_the_same_result(monkeypatch):
    """Chunked sparse steps (expansion sets, query expansion, jaccard join) agree when the
    chunks are forced down to a handful of rows/pairs."""
    qf, gf = clustered(7, 25, 90, n_ids=6)
    ref = re_ranking(qf, gf, k1=12, k2=4, lambda_value=0.3)
    monkeypatch.setattr(reranking, "_PAIR_BUDGET", 50)
    monkeypatch.setattr(reranking, "_GATHER_BUDGET", 64)
    small = re_ranking(qf, gf, k1=12, k2=4, lambda_value=0.3, block_size=9)
    np.testing.assert_allclose(small.numpy(), ref.numpy(), rtol=0, atol=1e-6)
    assert_matches_reference(qf, gf, 12, 4, 0.3, block_size=9)


def test_reranking_changes_the_ranking_and_lambda_one_is_the_normalised_distance():
    qf, gf = clustered(8, 20, 80, n_ids=5, noise=1.0)
    d = torch.cdist(qf, torch.cat([qf, gf])).pow(2)
    full = torch.cdist(torch.cat([qf, gf]), torch.cat([qf, gf])).pow(2)
    normalised = (d / full.max(dim=1).values[:20, None])[:, 20:]
    np.testing.assert_allclose(re_ranking(qf, gf, lambda_value=1.0).numpy(), normalised.numpy(), atol=1e-5)
    rr = re_ranking(qf, gf)
    assert not np.array_equal(np.argsort(rr.numpy(), axis=1), np.argsort(normalised.numpy(), axis=1))


@pytest.mark.parametrize("k1,k2,block", [(10, 4, 2048), (10, 4, 5), (30, 7, 4), (6, 1, 3)])
def test_exact_ties_are_ordered_by_index(k1, k2, block):
    """Small-integer features (plus exact duplicates) make every distance exact, so ties are
    plentiful and identical in both implementations: the neighbour lists must order them
    by index like the reference's stable argsort, whatever the block layout."""
    g = torch.Generator().manual_seed(11)
    feat = torch.randint(-2, 3, (70, 6), generator=g).float()
    feat = torch.cat([feat, feat[:15]])
    qf, gf = feat[:14], feat[14:]
    ours = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=0.3, block_size=block)
    ref = loop_re_ranking(qf, gf, k1, k2, 0.3)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-5)
    # tied final distances may differ in the last bit: rankings must agree up to such ties
    for row_ours, row_ref in zip(ours.numpy(), ref):
        assert np.all(np.diff(row_ref[np.argsort(row_ours, kind="stable")]) >= -2e-6)

    n = feat.shape[0]
    sq = feat.pow(2).sum(1, keepdim=True)
    exact = (sq + sq.t() - 2 * feat @ feat.t()).numpy()
    k = min(k1 + 1, n)
    _, nn_idx, rowmax = reranking._neighbours_and_rowmax(feat, k, 14, torch.empty(14, n - 14), block)
    np.testing.assert_array_equal(nn_idx.numpy(), np.argsort(exact, axis=1, kind="stable")[:, :k])
    np.testing.assert_array_equal(rowmax.numpy(), exact.max(axis=1))


def test_bad_arguments():
    qf, gf = clustered(10, 3, 5)
    with pytest.raises(ValueError):
        re_ranking(qf, gf[:, :4])
    with pytest.raises(ValueError):
        re_ranking(qf, gf, k2=0)
    with pytest.raises(ValueError, match="at least one"):
        re_ranking(qf[:0], gf)
