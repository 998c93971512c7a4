"""utils.distance: the one distance rule. Its settings come from the config in one place, and the
evaluator, the folder search, the gallery index and the evaluation pictures compute, rank and
break ties by it alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from utils.distance import DistanceSpec, ranked_indices, ranking, top_k_of_candidates
from utils.metrics import R1_mAP_eval, eval_func

SETTINGS = [("yes", "euclidean"), ("yes", "cosine"), ("no", "euclidean"), ("no", "cosine")]


def _features(seed=0, nq=12, ng=50, d=8):
    rng = np.random.default_rng(seed)
    q = torch.tensor(rng.normal(size=(nq, d)) * rng.uniform(0.5, 3, (nq, 1)), dtype=torch.float32)
    g = torch.tensor(rng.normal(size=(ng, d)) * rng.uniform(0.5, 3, (ng, 1)), dtype=torch.float32)
    g[[7, 30]] = g[3].clone()                           # equal distances: ties in gallery order
    pids = rng.integers(0, 6, nq + ng)
    cams = rng.integers(0, 3, nq + ng)
    return q, g, pids, cams


def test_from_cfg_reads_every_distance_key_and_every_user_agrees():
    from retrieval.index import metric_from_config
    cfg = load_config("", ["TEST.FEAT_NORM", "no", "TEST.DIST_METRIC", "cosine", "TEST.RE_RANKING", "True",
                           "TEST.RE_RANKING_K1", "9", "TEST.RE_RANKING_K2", "2", "TEST.RE_RANKING_LAMBDA", "0.2"])
    spec = DistanceSpec.from_cfg(cfg)
    assert spec == DistanceSpec(False, "cosine", True, 9, 2, 0.2)
    assert R1_mAP_eval.from_cfg(cfg, 3).spec == spec
    assert spec.name == "re-ranked (k-reciprocal)"
    with pytest.raises(ConfigError, match="TEST.RE_RANKING"):
        metric_from_config(cfg)                                    # an index cannot re-rank
    cfg.merge_from_list(["TEST.RE_RANKING", "False"])
    assert metric_from_config(cfg) == DistanceSpec.from_cfg(cfg) == DistanceSpec(False, "cosine", False, 9, 2, 0.2)
    assert [DistanceSpec(True, m).name for m in ("euclidean", "cosine")] == ["squared euclidean", "cosine distance"]
    with pytest.raises(ValueError, match="metric"):
        DistanceSpec(True, "manhattan")


@pytest.mark.parametrize("feat_norm,dist_metric", SETTINGS)
def test_the_matrix_is_the_formula_and_the_evaluator_ranks_it(feat_norm, dist_metric):
    q, g, pids, cams = _features()
    spec = DistanceSpec.from_cfg(load_config("", ["TEST.FEAT_NORM", feat_norm, "TEST.DIST_METRIC", dist_metric]))
    x, y = q.double().numpy(), g.double().numpy()
    if feat_norm == "yes" or dist_metric == "cosine":
        x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    ref = 1 - x @ y.T if dist_metric == "cosine" else ((x[:, None] - y[None]) ** 2).sum(-1)
    dist = spec.matrix(q, g)
    np.testing.assert_allclose(dist.numpy(), ref, atol=1e-4, rtol=1e-5)
    # the vectors an index stores, compared by the same formula: the same numbers, bit for bit
    assert torch.equal(spec.prepared_distances(spec.prepare(q), spec.prepare(g)), dist)
    cand = torch.stack([spec.prepare(g)[[0, 3, 7]]] * len(q))        # each query's own candidates
    np.testing.assert_allclose(spec.candidate_distances(spec.prepare(q), cand).numpy(), dist[:, [0, 3, 7]].numpy(),
                               atol=1e-5, rtol=0)
    # the pictures' row blocks are the matrix
    assert torch.equal(torch.cat([b for _, _, b in spec.blocks(q, g)]), dist)
    # the evaluator scores that matrix
    ev = R1_mAP_eval(len(q), feat_norm=spec.feat_norm, metric=spec.dist_metric)
    ev.update((torch.cat([q, g]), pids, cams))
    want = eval_func(dist, pids[:len(q)], pids[len(q):], cams[:len(q)], cams[len(q):])
    got = ev.compute()
    np.testing.assert_allclose(got[0], want[0], atol=1e-12)
    assert got[1:] == pytest.approx(want[1:], abs=1e-12)


def test_re_ranked_matrix_and_blocks_are_the_evaluators():
    from utils.reranking import re_ranking
    q, g, _, _ = _features(seed=1)
    spec = DistanceSpec(True, "euclidean", True, 6, 3, 0.3)
    qn, gn = torch.nn.functional.normalize(q), torch.nn.functional.normalize(g)
    want = re_ranking(qn, gn, k1=6, k2=3, lambda_value=0.3)
    assert torch.equal(spec.matrix(q, g), want)
    assert torch.equal(torch.cat([b for _, _, b in spec.blocks(q, g)]), want)


def test_one_tie_order_for_rows_and_candidate_lists():
    """Ascending, ties by gallery index: a full row (ranking), and a candidate list in any order with
    absent entries (id -1) as an index returns them (top_k_of_candidates)."""
    rng = np.random.default_rng(3)
    dist = rng.integers(0, 4, size=(6, 30)).astype(np.float32)
    want = np.argsort(dist, axis=1, kind="stable")
    np.testing.assert_array_equal(ranking(torch.from_numpy(dist)).numpy(), want)
    np.testing.assert_array_equal(ranked_indices(dist), want)
    perm = np.stack([rng.permutation(30) for _ in range(6)])
    ids = np.concatenate([perm, np.full((6, 3), -1)], axis=1)
    cand = np.concatenate([np.take_along_axis(dist, perm, 1), np.zeros((6, 3), np.float32)], axis=1)
    d, i = top_k_of_candidates(cand, ids, 10)
    np.testing.assert_array_equal(i, want[:, :10])
    np.testing.assert_array_equal(d, np.take_along_axis(dist, want[:, :10], 1))
