"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without dense N x N matrices.

Same result as the published algorithm (TransReID / CLIP-ReID ``utils/reranking.py``),
computed in float32, where N = num_query + num_gallery:

1. all-pairs squared Euclidean distance over query+gallery, each row divided by its
   maximum; ``R`` = each row's neighbours by ascending distance;
2. k-reciprocal set of i: the first k1+1 neighbours j of i that have i among their
   own first k1+1; expanded by the k-reciprocal set (with k1/2, banker's rounding) of each
   member c whenever more than 2/3 of that set lies in i's k-reciprocal set;
3. ``V[i, j] = exp(-d(i, j))`` over the expanded set, normalised to sum 1;
4. local query expansion (k2 != 1): ``V[i] = mean(V[R[i, :k2]])``;
5. Jaccard distance ``1 - s / (2 - s)`` with ``s = sum_k min(V[i, k], V[j, k])``;
6. ``final = jaccard * (1 - lambda) + d * lambda``, query rows x gallery columns.

Here nothing of size N x N is formed. Step 1 walks the upper triangle of the distance
matrix in square blocks (the matrix is symmetric) and keeps per row only the running
maximum and the running top-K neighbour list; the query x gallery part of the raw
distances is written straight into the output buffer. Steps 2-4 work on the (N, K)
neighbour lists and a CSR-like sparse ``V``; step 5 is a sparse join restricted to query
rows x gallery rows. Everything runs in torch on the features' device. The only dense
result is the (num_query, num_gallery) output.

Ties between equal distances are ordered by index, as the stable sort of the reference.
"""
from __future__ import annotations

import torch

from .distance import _distance_block_into, squared_euclidean_pairs

__all__ = ["re_ranking"]

# Work budgets (elements) for the chunked steps; they bound the temporaries' memory.
_PAIR_BUDGET = 1 << 22
_GATHER_BUDGET = 1 << 22


def _row_chunks(num_rows: int, per_row: int, budget: int = _GATHER_BUDGET) -> list[tuple[int, int]]:
    """(start, end) row chunks holding about ``budget`` elements (``per_row`` per row)."""
    step = max(1, budget // max(1, per_row))
    return [(s, min(s + step, num_rows)) for s in range(0, num_rows, step)]


def _to_keys(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (float32 value, then index): sortable in one pass."""
    bits = (vals.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    return (bits.long() << 32) | idx


def _from_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_to_keys``: (float32 values, indices)."""
    bits = (keys >> 32).int()
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _merge(top: torch.Tensor, new: torch.Tensor, k: int) -> torch.Tensor:
    """First k of two key lists (new may be padded with int64 max)."""
    return torch.sort(torch.cat([top, new], 1), dim=1).values[:, :k]


def _block_topk_keys(d: torch.Tensor, offset: int, k: int, along_rows: bool) -> torch.Tensor:
    """Keys of the k smallest entries of each row of ``d`` (of each column if not ``along_rows``).

    top-k picks any k among equal values at the cut, so entries equal to the k-th are all
    taken and the exact (value, index) order is settled by the key sort.
    """
    dim = 1 if along_rows else 0
    k = min(k, d.shape[dim])
    kth = torch.topk(d, k, dim=dim, largest=False, sorted=False).values.amax(dim=dim, keepdim=True)
    return _candidate_keys(d, d <= kth, offset, along_rows)


def _candidate_keys(d: torch.Tensor, mask: torch.Tensor, offset: int, along_rows: bool) -> torch.Tensor | None:
    """Keys of the entries of ``d`` selected by ``mask``, per row (per column if not
    ``along_rows``), padded with int64 max into a (rows, most) array; None if there are none."""
    r, c = mask.nonzero(as_tuple=True)  # row-major
    if r.numel() == 0:
        return None
    vals = d[r, c]
    if not along_rows:
        r, c = c, r
    keys = _to_keys(vals, c + offset)
    if not along_rows:
        order = torch.sort(r, stable=True).indices
        r, keys = r[order], keys[order]
    rows_n = d.shape[0] if along_rows else d.shape[1]
    counts = torch.bincount(r, minlength=rows_n)
    pos = torch.arange(r.numel(), device=d.device) - (torch.cumsum(counts, 0) - counts)[r]
    out = torch.full((rows_n, int(counts.max())), torch.iinfo(torch.long).max, dtype=torch.long, device=d.device)
    out[r, pos] = keys
    return out


def _update_topk(top: torch.Tensor, d: torch.Tensor, offset: int, k: int, along_rows: bool) -> torch.Tensor:
    """Merge block ``d`` into the running top-k key lists of its rows (``along_rows``) or of
    its columns; the block's other axis holds indices ``offset``, ``offset + 1``, ...

    Once a list is full only entries not above its current k-th value can enter; those are
    usually few and gathered sparsely instead of running a top-k over the block.
    """
    if top.shape[1] == k:
        kth = _from_keys(top[:, -1])[0]
        mask = d <= (kth.unsqueeze(1) if along_rows else kth.unsqueeze(0))
        new = _candidate_keys(d, mask, offset, along_rows)
        if new is None:
            return top
        if new.shape[1] <= 4 * k:  # otherwise a block top-k is cheaper than this merge
            return _merge(top, new, k)
    return _merge(top, _block_topk_keys(d, offset, k, along_rows), k)


def _neighbours_and_rowmax(
    feat: torch.Tensor, k: int, num_query: int, out: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k neighbour lists (values, indices; N x k, ordered by value then index) and row
    maxima of the squared Euclidean distance over ``feat``; writes the raw query x gallery
    distances into ``out``.

    The matrix is symmetric, so only blocks (I, J) with J >= I are computed, each serving
    rows I (along its rows) and rows J (along its columns). Diagonal blocks go first: their
    top-k fills every list, after which the off-diagonal blocks only contribute the few
    entries below each list's current k-th value. Lists are int64 keys ordered by
    (value, index), so ties are ordered by index as in a stable sort.
    """
    n, dev = feat.shape[0], feat.device
    sq = feat.pow(2).sum(dim=1)
    span = [(s, min(s + block, n)) for s in range(0, n, block)]
    top = [torch.empty((e - s, 0), dtype=torch.long, device=dev) for s, e in span]
    rowmax = torch.full((n,), -float("inf"), device=dev)
    pairs = [(i, i) for i in range(len(span))] + [(i, j) for i in range(len(span)) for j in range(i + 1, len(span))]
    for bi, bj in pairs:
        (a, ae), (b, be) = span[bi], span[bj]
        d = _distance_block_into(feat[a:ae], feat[b:be], sq[b:be], feat.new_empty((ae - a, be - b)))
        rowmax[a:ae] = torch.maximum(rowmax[a:ae], d.amax(dim=1))
        top[bi] = _update_topk(top[bi], d, b, k, along_rows=True)
        if bj != bi:
            rowmax[b:be] = torch.maximum(rowmax[b:be], d.amax(dim=0))
            top[bj] = _update_topk(top[bj], d, a, k, along_rows=False)
        # query rows x gallery columns of this block go to the output
        qe, ga = min(ae, num_query), max(b, num_query)
        if a < qe and ga < be:
            out[a:qe, ga - num_query:be - num_query] = d[: qe - a, ga - b:]
    nn_val, nn_idx = _from_keys(torch.cat(top))
    return nn_val, nn_idx, rowmax


def _reciprocal(rank: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) bool: row i's j-th neighbour has i among its own first k neighbours."""
    n = rank.shape[0]
    out = torch.empty((n, k), dtype=torch.bool, device=rank.device)
    for s, e in _row_chunks(n, k * k):
        fwd = rank[s:e, :k]
        back = rank[fwd, :k]  # (C, k, k)
        me = torch.arange(s, e, device=rank.device).view(-1, 1, 1)
        out[s:e] = (back == me).any(dim=2)
    return out


def _expansion_sets(rank: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (row pointer, sorted column indices) of each row's expanded k-reciprocal set."""
    n, dev = rank.shape[0], rank.device
    kf = min(k1 + 1, n)
    kh = min(int(round(k1 / 2)) + 1, n)  # Python round == np.around: banker's rounding
    recip = _reciprocal(rank, kf)  # (N, kf)
    half = _reciprocal(rank, kh)  # (N, kh)
    half_len = half.sum(dim=1).double()
    two_thirds = 2.0 / 3.0
    counts, cols = [], []
    per_row = kf * kh * kf + kf * (kh + 1)
    for s, e in _row_chunks(n, per_row):
        fwd, fwd_ok = rank[s:e, :kf], recip[s:e]  # i's k-reciprocal set = fwd[fwd_ok]
        cand = rank[fwd, :kh]  # (C, kf, kh): each member's k1/2 neighbours
        cand_ok = half[fwd]  # ... that are reciprocal
        in_set = ((cand.unsqueeze(-1) == fwd[:, None, None, :]) & fwd_ok[:, None, None, :]).any(-1)
        overlap = (in_set & cand_ok).sum(dim=2).double()
        accept = fwd_ok & (overlap > two_thirds * half_len[fwd])  # same float64 test as published
        members = torch.cat([fwd, cand.flatten(1)], dim=1)
        ok = torch.cat([fwd_ok, (cand_ok & accept.unsqueeze(-1)).flatten(1)], dim=1)
        members = torch.where(ok, members, n)  # n = "absent", sorts last
        members = torch.sort(members, dim=1).values
        first = torch.ones_like(ok)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        keep = first & (members < n)
        counts.append(keep.sum(dim=1))
        cols.append(members[keep])
    counts_t = torch.cat(counts)
    crow = torch.zeros(n + 1, dtype=torch.long, device=dev)
    crow[1:] = torch.cumsum(counts_t, 0)
    return crow, torch.cat(cols)


def _csr_rows(crow: torch.Tensor) -> torch.Tensor:
    """Row index of every stored entry of a CSR matrix."""
    n = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(n, device=crow.device), crow[1:] - crow[:-1])


def _pair_distances(feat: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    nn_val: torch.Tensor, nn_idx: torch.Tensor) -> torch.Tensor:
    """Squared distances of (rows, cols) pairs: looked up in the neighbour lists when there,
    otherwise recomputed from the features."""
    out = torch.empty(rows.numel(), dtype=feat.dtype, device=feat.device)
    hit = torch.empty(rows.numel(), dtype=torch.bool, device=feat.device)
    for s, e in _row_chunks(rows.numel(), nn_idx.shape[1]):
        found = nn_idx[rows[s:e]] == cols[s:e].unsqueeze(1)
        hit[s:e] = found.any(dim=1)
        slot = found.to(torch.uint8).argmax(dim=1, keepdim=True)
        out[s:e] = nn_val[rows[s:e]].gather(1, slot).squeeze(1)
    miss = (~hit).nonzero().squeeze(1)
    for s, e in _row_chunks(miss.numel(), feat.shape[1]):
        r, c = rows[miss[s:e]], cols[miss[s:e]]
        out[miss[s:e]] = squared_euclidean_pairs(feat[r], feat[c], sq[r], sq[c])
    return out


def _query_expansion(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, rank: torch.Tensor, k2: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse ``V'[i] = mean(V[rank[i, :k2]])`` (CSR in, CSR out)."""
    n, dev = crow.numel() - 1, crow.device
    nnz_row = crow[1:] - crow[:-1]
    src = rank[:, :k2]  # (N, k2) rows averaged into each row
    per_row = nnz_row[src].sum(dim=1)
    counts, cols, vals = [], [], []
    bounds = _budget_bounds(per_row, _PAIR_BUDGET)
    for s, e in zip(bounds[:-1], bounds[1:]):
        srcs = src[s:e].reshape(-1)
        lens = nnz_row[srcs]
        dst = torch.repeat_interleave(torch.arange(s, e, device=dev).repeat_interleave(k2), lens)
        start = torch.repeat_interleave(crow[srcs] - (torch.cumsum(lens, 0) - lens), lens)
        pos = start + torch.arange(int(lens.sum()), device=dev)
        summed = torch.sparse_coo_tensor(torch.stack([dst - s, col[pos]]), val[pos], (e - s, n),
                                         check_invariants=False).coalesce()
        r, c = summed.indices()
        counts.append(torch.bincount(r, minlength=e - s))
        cols.append(c)
        vals.append(summed.values() / k2)
    new_crow = torch.zeros(n + 1, dtype=torch.long, device=dev)
    new_crow[1:] = torch.cumsum(torch.cat(counts), 0)
    return new_crow, torch.cat(cols), torch.cat(vals)


def _budget_bounds(cost: torch.Tensor, budget: int) -> list[int]:
    """Split rows into consecutive chunks whose summed ``cost`` stays near ``budget``
    (a single row above budget gets a chunk of its own)."""
    n = cost.numel()
    if n == 0:
        return [0]
    csum = torch.cumsum(cost, 0).cpu()
    bounds, start, base = [0], 0, 0
    while start < n:
        end = int(torch.searchsorted(csum, base + budget, right=True))
        end = max(end, start + 1)
        bounds.append(min(end, n))
        start, base = bounds[-1], int(csum[bounds[-1] - 1])
    return bounds


def _jaccard_into(out: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                  num_query: int, rowmax: torch.Tensor, lambda_value: float, max_rows: int) -> None:
    """``out = jaccard * (1 - lambda) + (out / rowmax) * lambda`` for query x gallery, where
    ``out`` holds raw distances; the min-sum is a sparse join of query rows and gallery rows
    of V over their shared columns."""
    n, dev = crow.numel() - 1, crow.device
    num_gallery = n - num_query
    # gallery part of V by column (CSC): for column k, the gallery rows j with V[j, k] != 0
    g_start = int(crow[num_query])
    g_rows = _csr_rows(crow)[g_start:] - num_query
    g_cols, g_vals = col[g_start:], val[g_start:]
    by_col = torch.sort(g_cols, stable=True).indices
    csc_row, csc_val = g_rows[by_col], g_vals[by_col]
    col_cnt = torch.bincount(g_cols, minlength=n)
    col_ptr = torch.cumsum(col_cnt, 0) - col_cnt

    q_rows = _csr_rows(crow[: num_query + 1])
    q_cols, q_vals = col[:g_start], val[:g_start]
    pairs_per_entry = col_cnt[q_cols]
    pairs_per_row = torch.zeros(num_query, dtype=torch.long, device=dev).index_add_(0, q_rows, pairs_per_entry)
    bounds = _budget_bounds(pairs_per_row, _PAIR_BUDGET)
    # also bound the dense (rows x gallery) accumulator
    fine = [bounds[0]]
    for s, e in zip(bounds[:-1], bounds[1:]):
        fine += list(range(s + max_rows, e, max_rows)) + [e]
    for s, e in zip(fine[:-1], fine[1:]):
        es, ee = int(crow[s]), int(crow[e])
        cnt = pairs_per_entry[es:ee]
        ent = torch.repeat_interleave(torch.arange(es, ee, device=dev), cnt)
        offset = torch.arange(ent.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        pos = col_ptr[q_cols[ent]] + offset
        mins = torch.minimum(q_vals[ent], csc_val[pos])
        flat = (q_rows[ent] - s) * num_gallery + csc_row[pos]
        summed = torch.zeros((e - s) * num_gallery, dtype=out.dtype, device=dev)
        summed.index_add_(0, flat, mins)
        summed = summed.view(e - s, num_gallery)
        jaccard = 1 - summed / (2 - summed)
        block = out[s:e]
        block.div_(rowmax[s:e, None]).mul_(lambda_value)
        block.add_(jaccard.mul_(1 - lambda_value))


def re_ranking(qf: torch.Tensor, gf: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               block_size: int = 4096) -> torch.Tensor:
    """k-reciprocal re-ranked (num_query, num_gallery) distances, float32, on qf's device.

    Equal to the published ``re_ranking(qf, gf, k1, k2, lambda_value)`` (computed in float32
    there as well) without forming any N x N matrix; ``block_size`` is the side of the
    square distance blocks of the neighbour search.
    """
    if k1 < 0 or k2 < 1:
        raise ValueError(f"need k1 >= 0 and k2 >= 1, got k1={k1}, k2={k2}")
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"expected 2-D features of equal width, got {tuple(qf.shape)} and {tuple(gf.shape)}")
    if qf.shape[0] == 0 or gf.shape[0] == 0:
        raise ValueError(f"need at least one query and one gallery feature, got {qf.shape[0]} and {gf.shape[0]}")
    num_query = qf.shape[0]
    feat = torch.cat([qf.float(), gf.to(device=qf.device, dtype=torch.float32)], dim=0)
    n = feat.shape[0]
    kf = min(k1 + 1, n)
    kq = min(k2, n)
    k = max(kf, kq)

    out = torch.empty((num_query, n - num_query), dtype=torch.float32, device=feat.device)
    nn_val, nn_idx, rowmax = _neighbours_and_rowmax(feat, k, num_query, out, block_size)

    crow, col = _expansion_sets(nn_idx, k1)
    rows = _csr_rows(crow)
    sq = feat.pow(2).sum(dim=1)
    weight = torch.exp(-(_pair_distances(feat, sq, rows, col, nn_val, nn_idx) / rowmax[rows]))
    row_sum = torch.zeros(n, device=feat.device).index_add_(0, rows, weight)
    val = weight / row_sum[rows]
    del rows, weight, nn_val
    if k2 != 1:
        crow, col, val = _query_expansion(crow, col, val, nn_idx, kq)
    del nn_idx
    _jaccard_into(out, crow, col, val, num_query, rowmax, float(lambda_value),
                  max_rows=max(1, _PAIR_BUDGET // max(1, n - num_query)))
    return out
