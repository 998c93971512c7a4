"""utils.metrics against a plain per-query reference and scikit-learn's average precision."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from config import get_default_config
from tests.helpers import assert_same, loop_eval, sklearn_map
from utils import metrics
from utils.metrics import R1_mAP_eval, cosine_distance, distance_blocks, euclidean_distance, eval_func, evaluate


# ----------------------------------------------------------------------------- references
def has_valid_query(dist, q_pids, g_pids, q_cams, g_cams):
    return any(((g_pids == q_pids[i]) & (g_cams != q_cams[i])).any() for i in range(len(q_pids)))


def random_problem(rng, nq, ng, n_ids, n_cams, distractors=0, dim=None):
    """Labels (+ optional features); gallery pids drawn from n_ids + distractor ids."""
    q_pids = rng.integers(0, n_ids, nq)
    g_pids = rng.integers(0, n_ids + distractors, ng)
    q_cams = rng.integers(0, n_cams, nq)
    g_cams = rng.integers(0, n_cams, ng)
    if dim is None:
        dist = rng.random((nq, ng)).astype(np.float32)
        return dist, q_pids, g_pids, q_cams, g_cams
    centers = rng.normal(size=(n_ids + distractors, dim))
    qf = centers[q_pids] + rng.normal(scale=1.0, size=(nq, dim))
    gf = centers[g_pids] + rng.normal(scale=1.0, size=(ng, dim))
    return (torch.tensor(qf, dtype=torch.float32), torch.tensor(gf, dtype=torch.float32),
            q_pids, g_pids, q_cams, g_cams)


@pytest.fixture(params=["sparse_band", "dense_band"])
def band_path(request, monkeypatch):
    """Run a test through both ranking paths of utils.metrics (flat band list / row sort)."""
    monkeypatch.setattr(metrics, "DENSE_BAND_FRACTION", 2.0 if request.param == "sparse_band" else -1.0)
    return request.param


# ----------------------------------------------------------------------------- distances
def test_distances_match_float64_reference_and_blocking():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(37, 16)), rng.normal(size=(53, 16)) * 3
    ref_e = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    ref_c = 1 - (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    for bs in (None, 1, 5, 100):
        np.testing.assert_allclose(euclidean_distance(xt, yt, block_size=bs).numpy(), ref_e, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(cosine_distance(xt, yt, block_size=bs).numpy(), ref_c, atol=1e-5)
    blocks = list(distance_blocks(xt, yt, block_size=10))
    assert [(s, e) for s, e, _ in blocks] == [(0, 10), (10, 20), (20, 30), (30, 37)]
    with pytest.raises(ValueError, match="metric"):
        list(distance_blocks(xt, yt, metric="manhattan"))


# ----------------------------------------------------------------------------- eval_func
@pytest.mark.slow
@pytest.mark.parametrize("seed,nq,ng,n_ids,n_cams,distractors", [
    (0, 1, 1, 1, 2, 0),
    (1, 5, 7, 3, 2, 0),
    (2, 30, 200, 20, 6, 10),
    (3, 64, 500, 40, 3, 50),
    (4, 17, 40, 5, 1, 3),     # single camera: every same-pid entry is removed
    (5, 200, 90, 80, 4, 0),   # more queries than gallery, many queries without a match
])
def test_eval_func_matches_loop_and_sklearn(seed, nq, ng, n_ids, n_cams, distractors, band_path):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, nq, ng, n_ids, n_cams, distractors)
    if not has_valid_query(*problem):
        with pytest.raises(ValueError, match="no valid query"):
            eval_func(*problem)
        return
    for max_rank in (1, 10, 50, ng + 7):
        ref = loop_eval(*problem, max_rank=max_rank)
        for bs in (None, 1, 7):
            assert_same(eval_func(*problem, max_rank=max_rank, block_size=bs), ref)
    assert eval_func(*problem)[1] == pytest.approx(sklearn_map(*problem), abs=1e-9)


def test_eval_func_many_random_sizes_against_sklearn(band_path):
    rng = np.random.default_rng(42)
    checked = 0
    for _ in range(25):
        nq, ng = rng.integers(1, 40), rng.integers(1, 120)
        problem = random_problem(rng, nq, ng, int(rng.integers(1, 15)), int(rng.integers(1, 5)),
                                 int(rng.integers(0, 5)))
        if not has_valid_query(*problem):
            with pytest.raises(ValueError, match="no valid query"):
                eval_func(*problem, max_rank=20)
            continue
        ref = loop_eval(*problem, max_rank=20)
        ours = eval_func(*problem, max_rank=20)
        assert_same(ours, ref)
        assert ours[1] == pytest.approx(sklearn_map(*problem), abs=1e-9)
        checked += 1
    assert checked >= 15


def test_ties_follow_gallery_order_and_torch_numpy_inputs_agree(band_path):
    rng = np.random.default_rng(7)
    dist = rng.integers(0, 4, size=(20, 60)).astype(np.float32)  # many exact ties
    dist[rng.random(dist.shape) < 0.1] = np.inf  # and infinite distances, also tied
    qp, gp = rng.integers(0, 5, 20), rng.integers(0, 5, 60)
    qc, gc = rng.integers(0, 3, 20), rng.integers(0, 3, 60)
    ref = loop_eval(dist, qp, gp, qc, gc, max_rank=30)
    assert_same(eval_func(dist, qp, gp, qc, gc, max_rank=30), ref)
    assert_same(eval_func(torch.from_numpy(dist).double(), torch.from_numpy(qp), list(gp), qc, gc,
                          max_rank=30), ref)


def test_hand_computed_example(band_path):
    # one query (pid 1, cam 0); gallery by increasing distance:
    # pid1/cam0 (removed), pid2, pid1/cam1 (rank 2), pid3, pid1/cam2 (rank 4)
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    g_pids, g_cams = np.array([1, 2, 1, 3, 1]), np.array([0, 0, 1, 1, 2])
    cmc, m_ap, m_inp = eval_func(dist, [1], g_pids, [0], g_cams, max_rank=6)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1, 1])
    assert m_ap == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m_inp == pytest.approx(2 / 4)


def test_per_query_ap_is_eval_funcs_own_and_the_pictures_reuse_it(band_path):
    """One AP: ``metrics.per_query_ap`` (eval_func's statistics, query by query) is the plain loop's AP,
    NaN exactly for the queries eval_func leaves out, averages to its mAP, and the pictures' ranking
    (``visualize.rank_queries`` over row blocks of any height) returns it bit for bit."""
    from utils.visualize import rank_queries, row_blocks
    rng = np.random.default_rng(11)
    dist = rng.integers(0, 6, size=(40, 90)).astype(np.float32)       # ties, kept in gallery order
    qp, gp = rng.integers(0, 12, 40), rng.integers(1, 12, 90)
    qc, gc = rng.integers(0, 3, 40), rng.integers(0, 3, 90)
    ap = metrics.per_query_ap(dist, qp, gp, qc, gc)
    _, mAP, _, counts = eval_func(dist, qp, gp, qc, gc, return_counts=True)
    assert int(np.isnan(ap).sum()) == counts.dropped > 0
    assert np.nanmean(ap) == pytest.approx(mAP, abs=1e-12)
    for i in np.flatnonzero(~np.isnan(ap)):                            # each query alone, by the plain loop
        assert ap[i] == pytest.approx(loop_eval(dist[i:i + 1], qp[i:i + 1], gp, qc[i:i + 1], gc)[1], abs=1e-12)
    for rows in (1, 7, 40):
        got, top, _ = rank_queries(row_blocks(dist, rows=rows), qp, gp, qc, gc, topk=5)
        np.testing.assert_array_equal(got, ap)
        np.testing.assert_array_equal(top, np.argsort(dist, axis=1, kind="stable")[:, :5])


def test_no_valid_query_is_a_clear_error():
    dist = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="no valid query"):
        eval_func(dist, [0, 1], [0, 0, 5], [0, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="entries"):
        eval_func(dist, [0], [0, 0, 5], [0, 1], [0, 0, 0])


# ----------------------------------------------------------------------------- evaluate()
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_from_features_equals_eval_func(metric, band_path):
    rng = np.random.default_rng(3)
    qf, gf, qp, gp, qc, gc = random_problem(rng, 45, 300, 30, 4, distractors=20, dim=24)
    dist = (euclidean_distance if metric == "euclidean" else cosine_distance)(qf, gf)
    ref = eval_func(dist, qp, gp, qc, gc, max_rank=50)
    assert_same(ref, loop_eval(dist.numpy(), qp, gp, qc, gc, max_rank=50))
    for bs in (None, 1, 8):
        assert_same(evaluate(qf, gf, qp, gp, qc, gc, max_rank=50, metric=metric, block_size=bs), ref)


def test_cosine_equals_euclidean_on_normalised_features_only():
    rng = np.random.default_rng(4)
    qf, gf, qp, gp, qc, gc = random_problem(rng, 40, 250, 25, 3, dim=16)
    qf = qf * torch.rand(len(qf), 1) * 5 + 0.1  # very different norms
    gf = gf * torch.rand(len(gf), 1) * 5 + 0.1
    cos = evaluate(qf, gf, qp, gp, qc, gc, metric="cosine")
    euc_raw = evaluate(qf, gf, qp, gp, qc, gc, metric="euclidean")
    qn, gn = torch.nn.functional.normalize(qf), torch.nn.functional.normalize(gf)
    euc_norm = evaluate(qn, gn, qp, gp, qc, gc, metric="euclidean")
    # squared euclidean on unit vectors = 2 (1 - cos): same ranking, same metrics
    assert_same(cos, euc_norm, tol=1e-12)
    assert cos[1] != pytest.approx(euc_raw[1], abs=1e-6)


# ----------------------------------------------------------------------------- R1_mAP_eval
def _feed(evaluator, feats, pids, cams, batch=16):
    evaluator.reset()
    for s in range(0, len(feats), batch):
        evaluator.update((feats[s:s + batch], pids[s:s + batch], torch.as_tensor(cams[s:s + batch])))


def test_r1_map_eval_feat_norm_switch():
    rng = np.random.default_rng(5)
    qf, gf, qp, gp, qc, gc = random_problem(rng, 30, 150, 20, 3, dim=16)
    scale = torch.rand(len(qf) + len(gf), 1) * 10 + 0.05
    feats = torch.cat([qf, gf]) * scale
    pids, cams = list(np.concatenate([qp, gp])), np.concatenate([qc, gc])
    raw = R1_mAP_eval(len(qf), feat_norm=False)
    _feed(raw, feats, pids, cams)
    normed = R1_mAP_eval(len(qf), feat_norm=True)
    _feed(normed, feats, pids, cams)
    r_raw, r_norm = raw.compute(), normed.compute()
    q, g = feats[:30], feats[30:]
    assert_same(r_raw, loop_eval(euclidean_distance(q, g).numpy(), qp, gp, qc, gc), tol=1e-12)
    qn, gn = torch.nn.functional.normalize(q), torch.nn.functional.normalize(g)
    assert_same(r_norm, loop_eval(euclidean_distance(qn, gn).numpy(), qp, gp, qc, gc), tol=1e-12)
    assert r_raw[1] != pytest.approx(r_norm[1], abs=1e-6)


def test_r1_map_eval_reranking_switch_and_from_cfg():
    from utils.reranking import re_ranking

    rng = np.random.default_rng(6)
    qf, gf, qp, gp, qc, gc = random_problem(rng, 25, 120, 15, 3, dim=16)
    feats, pids, cams = torch.cat([qf, gf]), np.concatenate([qp, gp]), np.concatenate([qc, gc])
    cfg = get_default_config()
    cfg.merge_from_list(["TEST.RE_RANKING", "True", "TEST.RE_RANKING_K1", "12", "TEST.RE_RANKING_K2", "3",
                         "TEST.RE_RANKING_LAMBDA", "0.4", "TEST.FEAT_NORM", "no", "TEST.MAX_RANK", "10"])
    ev = R1_mAP_eval.from_cfg(cfg, num_query=25)
    assert (ev.reranking, ev.feat_norm, ev.k1, ev.k2, ev.lambda_value, ev.max_rank) == (True, False, 12, 3, 0.4, 10)
    _feed(ev, feats, pids, cams)
    reranked = ev.compute()
    ref = eval_func(re_ranking(qf, gf, k1=12, k2=3, lambda_value=0.4), qp, gp, qc, gc, max_rank=10)
    assert_same(reranked, ref, tol=1e-12)
    plain = evaluate(qf, gf, qp, gp, qc, gc, max_rank=10)
    assert reranked[1] != pytest.approx(plain[1], abs=1e-6)

    cfg2 = get_default_config()
    cfg2.merge_from_list(["TEST.DIST_METRIC", "cosine"])
    ev2 = R1_mAP_eval.from_cfg(cfg2, num_query=25)
    assert (ev2.reranking, ev2.feat_norm, ev2.metric, ev2.max_rank) == (False, True, "cosine", 50)
    _feed(ev2, feats, pids, cams)
    assert_same(ev2.compute(), evaluate(qf, gf, qp, gp, qc, gc, metric="cosine"), tol=1e-12)


@pytest.mark.parametrize("scratch", [1 << 20, 80, 1])  # one chunk; 2 rows per chunk; 1 row per chunk
def test_select_flat_ignores_stale_buffer_bytes(scratch, monkeypatch):
    """The selection compares a few rows at a time and scans the mask as 64-bit words: a block
    whose size is not a multiple of 8 must not pick up bytes left in the reused buffers by a
    larger block."""
    monkeypatch.setattr(metrics, "SELECT_SCRATCH_ELEMS", scratch)
    rng = np.random.default_rng(9)
    buffers = metrics._select_buffers(13, 37, torch.float32, torch.device("cpu"))
    for buf in buffers:
        buf.fill_(True)
    for b in (13, 5, 1, 3):
        dist = torch.from_numpy(rng.random((b, 37)).astype(np.float32))
        thresh = torch.from_numpy(rng.random(b).astype(np.float32))
        expected = (dist <= thresh[:, None]).view(-1).nonzero().squeeze(1)
        assert torch.equal(metrics._select_flat(dist, thresh, buffers), expected)
