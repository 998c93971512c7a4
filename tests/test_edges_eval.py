"""Edges of the evaluation core: dropped queries are counted and reported (log line and
results keys), and the counting ranking path equals the references on hard data (positives
ranked low, ties, many positives, same-camera removal, distractors)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import processor.inference as inference
from config import get_default_config
from reference.evaluation import exact_eval_func, published_eval_func, published_minp
from tests.helpers import assert_same, loop_eval, sklearn_map
from utils import metrics
from utils.metrics import QueryCounts, R1_mAP_eval, euclidean_distance, eval_func, evaluate


# ----------------------------------------------------------------------------- dropped queries
def dropped_problem():
    """5 queries, 1 matchable: pid 1 has a match from another camera; pid 2 only from its own
    camera; pid 3 is not in the gallery; pid 0 (distractor) and -1 (junk) have no match."""
    dist = np.array([[0.05, 0.1, 0.5, 0.3],
                     [0.2, 0.4, 0.6, 0.8],
                     [0.3, 0.2, 0.1, 0.4],
                     [0.5, 0.6, 0.7, 0.1],
                     [0.6, 0.5, 0.4, 0.3]], dtype=np.float32)
    q_pids, q_cams = np.array([1, 2, 3, 0, -1]), np.array([0, 1, 0, 0, 0])
    g_pids, g_cams = np.array([1, 2, 5, 0]), np.array([1, 1, 0, 0])
    return dist, q_pids, g_pids, q_cams, g_cams


EXPECTED = QueryCounts(given=5, evaluated=1, not_in_gallery=1, same_camera_only=1, distractor_or_junk=2)


@pytest.mark.parametrize("block_size", [None, 1, 2])
def test_eval_func_counts_dropped_queries_by_reason(block_size):
    dist, qp, gp, qc, gc = dropped_problem()
    cmc, m_ap, m_inp, counts = eval_func(dist, qp, gp, qc, gc, max_rank=4, block_size=block_size,
                                         return_counts=True)
    assert counts == EXPECTED and counts.dropped == 4
    # the metrics are those of the one matchable query alone (its match is at rank 1)
    assert_same((cmc, m_ap, m_inp), loop_eval(dist, qp, gp, qc, gc, max_rank=4))
    assert m_ap == 1.0
    assert counts.as_results() == {"num_query": 5, "num_evaluated": 1, "num_dropped": 4,
                                   "dropped_reason": {"not_in_gallery": 1, "same_camera_only": 1,
                                                      "distractor_or_junk": 2}}
    line = counts.describe()
    assert "1 of 5 queries evaluated, 4 dropped" in line and "only under the query's camera" in line
    assert len(eval_func(dist, qp, gp, qc, gc, max_rank=4)) == 3  # the plain call is unchanged


def test_a_distractor_query_with_a_distractor_match_is_evaluated_as_published():
    dist = np.array([[0.2, 0.1]], dtype=np.float32)
    counts = eval_func(dist, [0], [0, 7], [0], [1, 1], return_counts=True)[3]
    assert counts == QueryCounts(given=1, evaluated=1)
    assert counts.describe() == "all 1 queries evaluated"


def test_no_valid_query_error_says_why_each_was_dropped():
    dist, qp, gp, qc, gc = dropped_problem()
    with pytest.raises(ValueError, match="no valid query") as e:
        eval_func(dist[1:], qp[1:], gp, qc[1:], gc)
    assert "0 of 4 queries evaluated, 4 dropped" in str(e.value)
    assert "1 identity not in the gallery" in str(e.value)


def test_counts_from_features_with_and_without_reranking():
    rng = np.random.default_rng(0)
    qp, qc = np.array([1, 2, 3, 1, 2, 3]), np.array([0, 0, 0, 1, 1, 1])
    gp, gc = np.repeat([1, 2, 4], 4), np.tile([0, 1, 0, 0], 3)
    qf, gf = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(rng.normal(size=(12, 8)),
                                                                                          dtype=torch.float32)
    # pid 1, 2: cameras 0 and 1 in the gallery; pid 3 absent
    want = QueryCounts(given=6, evaluated=4, not_in_gallery=2)
    assert evaluate(qf, gf, qp, gp, qc, gc, return_counts=True)[3] == want
    for rerank in (False, True):
        ev = R1_mAP_eval(6, reranking=rerank, k1=4, k2=2)
        ev.update((torch.cat([qf, gf]), np.concatenate([qp, gp]), np.concatenate([qc, gc])))
        assert ev.compute(return_counts=True)[3] == want
        assert len(ev.compute()) == 3


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("drop", [True, False])
def test_do_inference_reports_dropped_queries_in_results_and_one_log_line(drop, monkeypatch):
    dist, qp, gp, qc, gc = dropped_problem()
    if not drop:
        qp, qc = qp[:1], qc[:1]
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(qp) + len(gp), 8, generator=g)
    pids, cams = torch.as_tensor(np.concatenate([qp, gp])), torch.as_tensor(np.concatenate([qc, gc]))
    monkeypatch.setattr(inference, "extract_features", lambda *a, **k: (feats, pids, cams))
    cfg = get_default_config()
    handler = _Records()
    log = logging.getLogger("svllreid")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)   # setLevel, not the attribute: it clears the logger's cached level checks
    try:
        results = inference.do_inference(cfg, None, None, len(qp), torch.device("cpu"))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = [r for r in handler.records if "quer" in r.getMessage().lower() and "Queries" in r.getMessage()]
    assert len(lines) == 1
    if drop:
        assert results["num_query"] == 5 and results["num_evaluated"] == 1 and results["num_dropped"] == 4
        assert results["dropped_reason"] == EXPECTED.reasons()
        assert lines[0].levelno == logging.WARNING
        assert "1 of 5 queries evaluated, 4 dropped" in lines[0].getMessage()
    else:
        assert (results["num_query"], results["num_evaluated"], results["num_dropped"]) == (1, 1, 0)
        assert lines[0].levelno == logging.INFO and "all 1 queries evaluated" in lines[0].getMessage()
    assert results["num_gallery"] == 4


# ----------------------------------------------------------------------------- hard data: ranking by counting
def hard_problem(seed, nq=40, ng=900, n_ids=12, n_cams=3, distractor_frac=0.2, occluded=0.3, dim=16):
    """Clustered features where a share of the images is 'occluded' (replaced by noise), so
    that many true matches rank low and the band up to the farthest one covers most of a row."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    centres = torch.randn(n_ids + 1, dim, generator=g)
    qp = rng.integers(0, n_ids + 1, nq)  # pid 0: distractor queries too
    gp = np.where(rng.random(ng) < distractor_frac, 0, rng.integers(1, n_ids + 1, ng))
    qc, gc = rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)

    def feats(p):
        x = centres[torch.from_numpy(p)] + 0.6 * torch.randn(len(p), dim, generator=g)
        occ = torch.rand(len(p), generator=g) < occluded
        x[occ] = 1.5 * torch.randn(int(occ.sum()), dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)
    return feats(qp), feats(gp), qp, gp, qc, gc


@pytest.fixture
def counted_calls(monkeypatch):
    """How many blocks went through the counting path."""
    calls = []
    real = metrics._ranked_matches_counted

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(metrics, "_ranked_matches_counted", spy)
    return calls


def check_against_references(dist, qp, gp, qc, gc, ours, max_rank=50, distinct=True):
    """ours = (cmc, mAP, mINP) against the exact loops and, when distances are distinct (no
    ties, which np.argsort and scikit-learn order otherwise), the published code and scikit-learn."""
    dist = np.asarray(dist)
    ref = exact_eval_func(dist, qp, gp, qc, gc, max_rank=max_rank)
    np.testing.assert_allclose(ours[0][: len(ref[0])], ref[0], rtol=0, atol=1e-6)
    assert ours[1] == pytest.approx(ref[1], abs=1e-9) and ours[2] == pytest.approx(ref[2], abs=1e-9)
    assert_same(ours, loop_eval(dist, qp, gp, qc, gc, max_rank=max_rank))
    if distinct:
        assert ours[1] == pytest.approx(sklearn_map(dist, qp, gp, qc, gc), abs=1e-9)
        p_cmc, p_map = published_eval_func(dist, qp, gp, qc, gc, max_rank=max_rank)
        np.testing.assert_allclose(ours[0][: len(p_cmc)], p_cmc, rtol=0, atol=1e-6)
        assert ours[1] == pytest.approx(p_map, abs=1e-9)
        assert ours[2] == pytest.approx(published_minp(dist, qp, gp, qc, gc), abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_features_take_the_counting_path_and_equal_the_references(seed, counted_calls):
    qf, gf, qp, gp, qc, gc = hard_problem(seed)
    dist = euclidean_distance(qf, gf)
    ours = evaluate(qf, gf, qp, gp, qc, gc, max_rank=50)
    assert counted_calls, "hard data must be ranked by counting (default DENSE_BAND_FRACTION)"
    assert ours[2] < 0.3 < ours[1]  # hard: true matches ranked low, yet some near the top
    check_against_references(dist.numpy(), qp, gp, qc, gc, ours)
    for bs in (1, 7):
        assert_same(evaluate(qf, gf, qp, gp, qc, gc, max_rank=50, block_size=bs), ours, tol=1e-12)
    assert_same(eval_func(dist, qp, gp, qc, gc, max_rank=50), ours, tol=1e-12)


@pytest.mark.parametrize("scratch", [1 << 20, 3000, 1])  # chunks of many rows; 1-2 rows; the 2-row minimum
def test_counting_path_with_ties_junk_and_distractors(scratch, counted_calls, monkeypatch):
    """Integer distances: nearly every true match ties with other entries (negatives, junk,
    other true matches), before and after it in gallery order; infinite distances too."""
    monkeypatch.setattr(metrics, "SELECT_SCRATCH_ELEMS", scratch)
    monkeypatch.setattr(metrics, "COUNT_SCRATCH_ELEMS", scratch)
    rng = np.random.default_rng(11)
    nq, ng = 50, 300
    dist = rng.integers(0, 6, size=(nq, ng)).astype(np.float32)
    dist[rng.random(dist.shape) < 0.05] = np.inf
    qp, gp = rng.integers(0, 6, nq), rng.integers(0, 6, ng)  # pid 0 = distractor, on both sides
    qc, gc = rng.integers(0, 2, nq), rng.integers(0, 2, ng)  # 2 cameras: many removed entries
    ours = eval_func(dist, qp, gp, qc, gc, max_rank=50)
    assert counted_calls
    check_against_references(dist, qp, gp, qc, gc, ours, distinct=False)
    assert_same(eval_func(torch.from_numpy(dist).double(), qp, gp, qc, gc, max_rank=50), ours, tol=1e-12)
    for bs in (1, 13):
        assert_same(eval_func(dist, qp, gp, qc, gc, max_rank=50, block_size=bs), ours, tol=1e-12)


def test_counting_path_with_many_true_matches_per_query(counted_calls):
    """Few identities over a large gallery: hundreds of true matches per query, spread over the row."""
    qf, gf, qp, gp, qc, gc = hard_problem(5, nq=30, ng=1200, n_ids=3, n_cams=4, occluded=0.4)
    assert min(((gp == p) & (gc != c)).sum() for p, c in zip(qp, qc) if p) > 150
    ours = evaluate(qf, gf, qp, gp, qc, gc, max_rank=100)
    assert counted_calls
    check_against_references(euclidean_distance(qf, gf).numpy(), qp, gp, qc, gc, ours, max_rank=100)


def test_counting_and_listing_paths_agree_on_any_data(monkeypatch):
    """The same block through both paths (forced): identical metrics, easy and hard data alike."""
    for seed, occluded in ((3, 0.0), (4, 0.5)):
        qf, gf, qp, gp, qc, gc = hard_problem(seed, occluded=occluded)
        out = {}
        for name, frac in (("listed", 2.0), ("counted", -1.0)):
            monkeypatch.setattr(metrics, "DENSE_BAND_FRACTION", frac)
            out[name] = evaluate(qf, gf, qp, gp, qc, gc, max_rank=50)
        assert_same(out["counted"], out["listed"], tol=1e-12)
