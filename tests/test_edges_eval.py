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
from utils.metrics import QueryCounts, R1_mAP_eval, eval_func, evaluate

from test_metrics import assert_same, loop_eval


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
    monkeypatch.setattr(log, "level", logging.INFO)
    try:
        results = inference.do_inference(cfg, None, None, len(qp), torch.device("cpu"))
    finally:
        log.removeHandler(handler)
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
