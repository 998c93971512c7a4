"""Ours against the published code as published (reference/evaluation.py): the benchmark's baseline
must compute what ours computes, so that its timings compare the same work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reference.evaluation import (
    exact_eval_func,
    exact_re_ranking,
    published_euclidean_distance,
    published_eval_func,
    published_minp,
    published_re_ranking,
)
from utils.metrics import euclidean_distance, eval_func, evaluate
from utils.reranking import re_ranking

# float16 spacing on [0.5, 1) is 2^-11 ~ 4.9e-4. The published Jaccard term is a float16
# running sum of float16 minima (tens to hundreds of additions, each rounding by up to half
# a spacing) over float16 V / V_qe, so differences of several spacings are expected: up to
# ~4e-3 was seen on these problems. 5e-3 is about ten spacings.
FLOAT16_ATOL = 5e-3


def clustered_problem(seed: int, nq: int, ng: int, n_ids: int, n_cams: int, dim: int = 16, noise: float = 0.8,
                      dtype: torch.dtype = torch.float32):
    """Features around identity centres with labels; a tenth of the gallery are distractors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids + 1, dim))
    q_pids = rng.integers(1, n_ids + 1, nq)
    g_pids = np.where(rng.random(ng) < 0.1, 0, rng.integers(1, n_ids + 1, ng))
    q_cams, g_cams = rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)
    qf = centres[q_pids] + noise * rng.normal(size=(nq, dim))
    gf = centres[g_pids] + noise * rng.normal(size=(ng, dim))
    return (torch.tensor(qf, dtype=dtype), torch.tensor(gf, dtype=dtype),
            q_pids, g_pids, q_cams, g_cams)


@pytest.mark.parametrize("seed,nq,ng,n_ids,n_cams,dtype", [
    (0, 20, 80, 10, 3, torch.float32),
    (3, 7, 60, 3, 2, torch.float32),
    (1, 50, 400, 30, 6, torch.float64),  # float64: no exact ties among hundreds per row
    (2, 120, 900, 60, 4, torch.float64),
])
def test_published_eval_equals_ours(seed, nq, ng, n_ids, n_cams, dtype):
    qf, gf, qp, gp, qc, gc = clustered_problem(seed, nq, ng, n_ids, n_cams, dtype=dtype)
    dist = published_euclidean_distance(qf, gf)
    np.testing.assert_array_equal(dist, euclidean_distance(qf, gf).numpy())  # same formula, same bits
    assert all(len(np.unique(row)) == ng for row in dist)  # no ties: the unstable argsort is unambiguous
    # the published code needs every filtered gallery row to be at least max_rank long
    max_rank = min(50, min(int(np.sum(~((gp == p) & (gc == c)))) for p, c in zip(qp, qc)))
    cmc, m_ap, m_inp = evaluate(qf, gf, qp, gp, qc, gc, max_rank=max_rank)
    p_cmc, p_map = published_eval_func(dist, qp, gp, qc, gc, max_rank=max_rank)
    np.testing.assert_allclose(cmc, p_cmc, rtol=0, atol=1e-6)  # published CMC is float32
    assert m_ap == pytest.approx(p_map, abs=1e-12)
    assert m_inp == pytest.approx(published_minp(dist, qp, gp, qc, gc), abs=1e-12)
    e_cmc, e_map, e_inp = exact_eval_func(dist, qp, gp, qc, gc, max_rank=max_rank)
    np.testing.assert_allclose(cmc, e_cmc, rtol=0, atol=1e-6)
    assert (m_ap, m_inp) == (pytest.approx(e_map, abs=1e-12), pytest.approx(e_inp, abs=1e-12))


def test_published_eval_shrinks_max_rank_to_the_gallery():
    qf, gf, qp, gp, qc, gc = clustered_problem(4, 10, 30, 5, 3)
    qc = np.full_like(qc, 3)  # no same-camera removal: every row keeps the 30 entries
    p_cmc, p_map = published_eval_func(published_euclidean_distance(qf, gf), qp, gp, qc, gc, max_rank=50)
    cmc, m_ap, _ = evaluate(qf, gf, qp, gp, qc, gc, max_rank=50)
    assert p_cmc.shape == (30,) and cmc.shape == (50,)
    np.testing.assert_allclose(cmc[:30], p_cmc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cmc[30:], 1.0)
    assert m_ap == pytest.approx(p_map, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("seed,nq,ng,k1,k2,lam", [
    (0, 10, 50, 20, 6, 0.3),
    (1, 40, 300, 20, 6, 0.3),
    (2, 30, 120, 7, 3, 0.5),
    (3, 15, 70, 5, 1, 0.3),
    (4, 8, 40, 45, 15, 0.1),
])
def test_published_reranking_equals_ours_within_float16(seed, nq, ng, k1, k2, lam):
    qf, gf, qp, gp, qc, gc = clustered_problem(seed, nq, ng, max(3, ng // 8), 4)
    ours = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam).numpy()
    published = published_re_ranking(qf, gf, k1, k2, lam)
    assert published.dtype == np.float32 and published.shape == ours.shape  # float16 Jaccard + float32 distance
    np.testing.assert_allclose(ours, published, rtol=0, atol=FLOAT16_ATOL)
    assert float(np.abs(ours - published).mean()) < 1e-3
    # and exactly (float32 rounding) the same as the float32 loop of the same algorithm
    np.testing.assert_allclose(ours, exact_re_ranking(qf, gf, k1, k2, lam), rtol=0, atol=1e-5)
    # the metrics of the two re-ranked matrices can differ only through float16 near-ties
    m_ours = eval_func(ours, qp, gp, qc, gc, max_rank=5)[1]
    m_pub = published_eval_func(published, qp, gp, qc, gc, max_rank=5)[1]
    assert m_ours == pytest.approx(m_pub, abs=0.02)
