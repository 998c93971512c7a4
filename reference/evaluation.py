"""Reference implementations of the published evaluation code, for tests and benchmarks.

Two kinds, both plain dense numpy/torch code with Python loops:

* ``published_*``: the published CLIP-ReID / TransReID ``utils/metrics.py`` and
  ``utils/reranking.py`` as published, with their dtypes, sort calls and vectorisation:
  the full distance matrix in torch, ``np.argsort`` (numpy's default, not stable), a
  per-query loop with vectorised AP, and re-ranking with V, V_qe and the Jaccard distance
  in float16. These are what ``bench/eval.py`` times. Changes, and why:

  - ``dist_mat.addmm_(1, -2, qf, gf.t())`` is written ``addmm_(qf, gf.t(), beta=1,
    alpha=-2)``: the positional (beta, alpha) form was removed from torch; same call.
  - re-ranking: the published code moves the features to the GPU (``.cuda()``) before
    ``torch.cat``; here they stay on the CPU (there is no GPU on the benchmark machine).
    Nothing else differs.
  - ``eval_func`` prints a note when the gallery is smaller than ``max_rank``; the note
    is left out (the value of ``max_rank`` is changed as published).
  - The published ``eval_func`` has no mINP. ``published_minp`` computes it separately
    (as fast-reid does, from the same sorted indices) so that it is not part of the
    published timing.

* ``exact_*``: the same algorithms as plain, exact loops (stable argsort; AP with the
  per-element Python loop; mINP; re-ranking in float32). Ours must equal these exactly
  (up to float32 rounding for re-ranking); they are the strict references of the tests.

Nothing of the product imports it (the layers contract in pyproject.toml keeps it so).
"""
from __future__ import annotations

import numpy as np
import torch


# ----------------------------------------------------------------------------- as published
def published_euclidean_distance(qf: torch.Tensor, gf: torch.Tensor) -> np.ndarray:
    """Published ``euclidean_distance``: full squared-distance matrix in torch, as numpy."""
    m = qf.shape[0]
    n = gf.shape[0]
    dist_mat = torch.pow(qf, 2).sum(dim=1, keepdim=True).expand(m, n) + \
        torch.pow(gf, 2).sum(dim=1, keepdim=True).expand(n, m).t()
    dist_mat.addmm_(qf, gf.t(), beta=1, alpha=-2)
    return dist_mat.cpu().numpy()


def published_eval_func(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                        g_camids: np.ndarray, max_rank: int = 50) -> tuple[np.ndarray, float]:
    """Published ``eval_func``: (CMC[:max_rank], mAP); np.argsort, per-query loop, vectorised AP."""
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)

    all_cmc = []
    all_AP = []
    num_valid_q = 0.
    for q_idx in range(num_q):
        q_pid = q_pids[q_idx]
        q_camid = q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        orig_cmc = matches[q_idx][keep]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.
        num_rel = orig_cmc.sum()
        tmp_cmc = orig_cmc.cumsum()
        y = np.arange(1, tmp_cmc.shape[0] + 1) * 1.0
        tmp_cmc = tmp_cmc / y
        tmp_cmc = np.asarray(tmp_cmc) * orig_cmc
        AP = tmp_cmc.sum() / num_rel
        all_AP.append(AP)
    assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
    all_cmc = np.asarray(all_cmc).astype(np.float32)
    all_cmc = all_cmc.sum(0) / num_valid_q
    mAP = np.mean(all_AP)
    return all_cmc, float(mAP)


def published_minp(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                   g_camids: np.ndarray) -> float:
    """mINP as fast-reid computes it (not part of the published ``eval_func``); np.argsort."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_INP = []
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        orig_cmc = matches[q_idx][np.invert(remove)]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        pos_idx = np.where(orig_cmc == 1)
        max_pos_idx = np.max(pos_idx)
        all_INP.append(cmc[max_pos_idx] / (max_pos_idx + 1.0))
    return float(np.mean(all_INP))


def published_re_ranking(probFea: torch.Tensor, galFea: torch.Tensor, k1: int, k2: int, lambda_value: float,
                         local_distmat: np.ndarray | None = None, only_local: bool = False,
                         dtype: type = np.float16, argsort_kind: str | None = None) -> np.ndarray:
    """Published ``re_ranking`` (V, V_qe and Jaccard in float16); features stay on the CPU.

    ``dtype`` and ``argsort_kind`` are this reference's only additions; their defaults are
    the published behaviour (see :func:`exact_re_ranking` for the other setting).
    """
    query_num = probFea.size(0)
    all_num = query_num + galFea.size(0)
    if only_local:
        original_dist = local_distmat
    else:
        feat = torch.cat([probFea, galFea])  # published: torch.cat([probFea, galFea]).cuda()
        distmat = torch.pow(feat, 2).sum(dim=1, keepdim=True).expand(all_num, all_num) + \
            torch.pow(feat, 2).sum(dim=1, keepdim=True).expand(all_num, all_num).t()
        distmat.addmm_(feat, feat.t(), beta=1, alpha=-2)
        original_dist = distmat.cpu().numpy()
        del feat
        if local_distmat is not None:
            original_dist = original_dist + local_distmat
    gallery_num = original_dist.shape[0]
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(dtype)
    initial_rank = np.argsort(original_dist, kind=argsort_kind).astype(np.int32)

    for i in range(all_num):
        # k-reciprocal neighbors
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[candidate, :int(np.around(k1 / 2)) + 1]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index,
                                                            :int(np.around(k1 / 2)) + 1]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
                    candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)

        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=dtype)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])

    jaccard_dist = np.zeros_like(original_dist, dtype=dtype)

    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=dtype)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(V[i, indNonZero[j]],
                                                                               V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    del original_dist
    del V
    del jaccard_dist
    final_dist = final_dist[:query_num, query_num:]
    return final_dist


# ----------------------------------------------------------------------------- exact loops
def exact_eval_func(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                    g_camids: np.ndarray, max_rank: int = 50) -> tuple[np.ndarray, float, float]:
    """Per-query loop (published protocol) with a stable argsort, AP by the per-element loop
    and mINP (fast-reid): (CMC[:max_rank], mAP, mINP)."""
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_AP, all_INP = [], [], []
    num_valid_q = 0.
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        orig_cmc = matches[q_idx][np.invert(remove)]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        max_pos_idx = np.max(np.where(orig_cmc == 1))
        all_INP.append(cmc[max_pos_idx] / (max_pos_idx + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.
        num_rel = orig_cmc.sum()
        tmp_cmc = orig_cmc.cumsum()
        tmp_cmc = [x / (i + 1.) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * orig_cmc
        all_AP.append(tmp_cmc.sum() / num_rel)
    assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
    all_cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / num_valid_q
    return all_cmc, float(np.mean(all_AP)), float(np.mean(all_INP))


def exact_re_ranking(probFea: torch.Tensor, galFea: torch.Tensor, k1: int = 20, k2: int = 6,
                     lambda_value: float = 0.3) -> np.ndarray:
    """The published re-ranking algorithm with V, V_qe and Jaccard in float32 and a stable
    argsort (ties by index): the exact reference of ``utils.reranking.re_ranking``."""
    return published_re_ranking(probFea, galFea, k1, k2, lambda_value, dtype=np.float32, argsort_kind="stable")


__all__ = [
    "published_euclidean_distance", "published_eval_func", "published_minp", "published_re_ranking",
    "exact_eval_func", "exact_re_ranking",
]
