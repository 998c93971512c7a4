"""ReID evaluation: CMC / mAP / mINP (Market-1501 protocol), per-query AP and the evaluator.

The distances come from ``utils.distance`` (the project's one distance rule, re-exported here).
Everything runs in torch on the device of the inputs and works on blocks of queries, so
memory stays bounded by ``block_size`` rows of the (query x gallery) problem.

Protocol (as in the published CLIP-ReID / TransReID ``eval_func``):

* gallery entries are ranked by ascending distance; ties keep gallery order (a stable
  sort by gallery index, ``utils.distance.ranking``);
* for each query, gallery entries with the same pid *and* the same camera are removed;
* a query with no remaining true match is skipped; if no query is left it is an error;
* CMC[r] = fraction of valid queries whose first true match is at rank <= r + 1. The curve
  always has ``max_rank`` entries: where the (filtered) gallery is shorter than
  ``max_rank`` the curve is padded with its last value (which is 1.0, since every valid
  query has a match). The published code instead shrinks ``max_rank`` to the gallery size;
  the values it does report are identical;
* AP = mean over the true matches of (precision at that match's rank); mAP = mean AP;
* INP = (number of true matches) / (1-based rank of the last true match); mINP = mean INP.

The ranks are found without sorting whole rows: one pass over a block of rows selects the
entries not farther than each query's farthest true match; of those, the ones closer than
its nearest true match are just counted and only the rest (its "band") is sorted.
``evaluate`` fuses this into the distance computation: each block of query rows is
computed (one GEMM into a reused buffer) and evaluated while it is still in cache, so the
full (query x gallery) matrix is never formed nor read twice.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .distance import (
    DistanceSpec,
    _distance_block_into,
    _prepare_features,
    _rows_per_block,
    cosine_distance,
    distance_blocks,
    euclidean_distance,
    pairwise_distance,
)

__all__ = [
    "euclidean_distance",
    "cosine_distance",
    "pairwise_distance",
    "distance_blocks",
    "eval_func",
    "per_query_ap",
    "evaluate",
    "QueryCounts",
    "R1_mAP_eval",
]

# Float scratch of the selection pass (elements): 4 MB of float32, the L2 of the two cores.
SELECT_SCRATCH_ELEMS = 1 << 20
# Float scratch of the counting path (elements): 16 MB of float32, half the L3. Each comparison
# covers several rows x all their true matches x the gallery at once: few large kernels, so the
# cost does not depend on how fast idle OpenMP threads wake up (OMP_WAIT_POLICY=PASSIVE).
COUNT_SCRATCH_ELEMS = 1 << 22
# Above this fraction of in-band entries a block sorts whole rows (parallel over rows)
# instead of a flat list of band entries.
DENSE_BAND_FRACTION = 1 / 16




# ----------------------------------------------------------------------------- CMC / mAP / mINP
def _as_tensor(a: Any, device: torch.device | None = None) -> torch.Tensor:
    """numpy array / sequence / tensor -> tensor (no copy for numpy when possible)."""
    if isinstance(a, torch.Tensor):
        t = a
    elif isinstance(a, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        t = torch.as_tensor(np.asarray(a))
    return t if device is None else t.to(device)


@dataclass(frozen=True)
class QueryCounts:
    """How many queries were given and evaluated, and why the others were dropped.

    A query is dropped when no gallery entry of its identity is left once the entries of
    its identity *and* camera are removed: ``not_in_gallery`` (the gallery has no entry of
    its identity), ``same_camera_only`` (it has some, all from the query's camera) or
    ``distractor_or_junk`` (the query's identity is the distractor (0) or junk (-1) label
    of the Market naming scheme, whatever the gallery holds).
    """

    given: int
    evaluated: int
    not_in_gallery: int = 0
    same_camera_only: int = 0
    distractor_or_junk: int = 0

    @property
    def dropped(self) -> int:
        """Number of queries given but not evaluated."""
        return self.given - self.evaluated

    def reasons(self) -> dict[str, int]:
        """{reason: number of dropped queries}, every reason listed (0 included)."""
        return {"not_in_gallery": self.not_in_gallery, "same_camera_only": self.same_camera_only,
                "distractor_or_junk": self.distractor_or_junk}

    def as_results(self) -> dict[str, Any]:
        """The keys ``results.json`` carries: num_query (given), num_evaluated, num_dropped, dropped_reason."""
        return {"num_query": self.given, "num_evaluated": self.evaluated, "num_dropped": self.dropped,
                "dropped_reason": self.reasons()}

    def describe(self) -> str:
        """One line: how many queries were evaluated and, if any was dropped, why."""
        if not self.dropped:
            return f"all {self.given} queries evaluated"
        words = {"not_in_gallery": "identity not in the gallery",
                 "same_camera_only": "identity in the gallery only under the query's camera",
                 "distractor_or_junk": "distractor/junk identity (pid <= 0)"}
        why = "; ".join(f"{n} {words[k]}" for k, n in self.reasons().items() if n)
        return f"{self.evaluated} of {self.given} queries evaluated, {self.dropped} dropped ({why})"


class _Accumulator:
    """Running sums of the per-query statistics over blocks of queries."""

    def __init__(self, max_rank: int, num_query: int | None = None) -> None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be a positive integer, got {max_rank}")
        self.max_rank = int(max_rank)
        # each query's AP (NaN: not evaluated), kept when the number of queries is given
        self.query_ap = None if num_query is None else np.full(int(num_query), np.nan)
        self.cmc_hits = np.zeros(self.max_rank, dtype=np.int64)
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.num_valid = 0
        self.num_given = 0
        self.dropped = np.zeros(3, dtype=np.int64)  # not_in_gallery, same_camera_only, distractor_or_junk

    def add(self, first_rank: torch.Tensor, ap: torch.Tensor, inp: torch.Tensor, num_given: int,
            dropped: torch.Tensor, valid: torch.Tensor) -> None:
        """Add the statistics of the valid queries (``valid``) of one block of ``num_given`` queries
        and the counts of its dropped ones by reason (see ``_dropped_reasons``)."""
        if self.query_ap is not None:
            self.query_ap[self.num_given + np.flatnonzero(valid.cpu().numpy())] = ap.cpu().numpy()
        self.num_valid += int(first_rank.numel())
        self.num_given += int(num_given)
        self.dropped += dropped.cpu().numpy()
        if first_rank.numel():
            capped = first_rank.clamp(max=self.max_rank + 1) - 1  # 0-based, max_rank = "beyond"
            hits = torch.bincount(capped, minlength=self.max_rank + 1)[: self.max_rank]
            self.cmc_hits += hits.cpu().numpy()
            self.ap_sum += float(ap.sum())
            self.inp_sum += float(inp.sum())

    def counts(self) -> QueryCounts:
        """Queries given, evaluated and dropped (by reason) so far."""
        return QueryCounts(self.num_given, self.num_valid, *(int(n) for n in self.dropped))

    def result(self) -> tuple[np.ndarray, float, float]:
        if self.num_valid == 0:
            raise ValueError(
                "no valid query: no query has a true match in the gallery after removing "
                f"same-pid same-camera gallery entries ({self.counts().describe()})"
            )
        cmc = np.cumsum(self.cmc_hits) / self.num_valid
        return cmc, self.ap_sum / self.num_valid, self.inp_sum / self.num_valid


def _dropped_reasons(q_pids: torch.Tensor, valid: torch.Tensor, same_pid_rows: torch.Tensor) -> torch.Tensor:
    """(not_in_gallery, same_camera_only, distractor_or_junk) counts of the invalid queries.

    ``same_pid_rows``: the query row of every gallery entry sharing the query's pid (junk
    included), so a row without any has an identity the gallery does not hold.
    """
    dropped = ~valid
    junk_id = dropped & (q_pids <= 0)
    has_pid = torch.bincount(same_pid_rows, minlength=q_pids.numel()) > 0
    rest = dropped & ~junk_id
    return torch.stack([(rest & ~has_pid).sum(), (rest & has_pid).sum(), junk_id.sum()])


class _PidGroups:
    """Gallery entries grouped by pid, so each query's same-pid entries are found sparsely."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor) -> None:
        g_pids = g_pids.long()
        self.order = torch.argsort(g_pids, stable=True)
        self.pids, self.counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.camids = g_camids
        self.num = g_pids.numel()

    def same_pid_pairs(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query row, gallery column) of every gallery entry sharing the query's pid."""
        q_pids = q_pids.long()
        if self.num == 0:
            empty = torch.empty(0, dtype=torch.long, device=q_pids.device)
            return empty, empty
        slot = torch.searchsorted(self.pids, q_pids).clamp(max=self.pids.numel() - 1)
        count = torch.where(self.pids[slot] == q_pids, self.counts[slot], 0)
        rows = torch.repeat_interleave(torch.arange(q_pids.numel(), device=q_pids.device), count)
        offset = torch.arange(rows.numel(), device=q_pids.device) - (torch.cumsum(count, 0) - count)[rows]
        return rows, self.order[self.starts[slot][rows] + offset]


def _select_mask(dist: torch.Tensor, thresh: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Fill the flat bool mask of ``buffers`` with ``d <= thresh[row]`` for ``dist`` (B, G);
    returns the number of entries selected.

    ``buffers`` = (float scratch of at least one row, flat bool mask of at least B * G
    rounded up to 8 entries), reused across blocks (see ``_select_buffers``). torch's CPU
    comparison kernels are vectorised only when the result has the inputs' dtype, so the
    comparison is written as 0/1 floats into the cache-sized scratch, a few rows at a time,
    counted there and copied to bool from there.
    """
    scratch, mask = buffers
    (B, G), n = dist.shape, dist.numel()
    n8 = -(-n // 8) * 8
    step = max(1, scratch.numel() // max(1, G))
    sums = []
    for s in range(0, B, step):
        e = min(s + step, B)
        chunk = scratch[: (e - s) * G]
        torch.le(dist[s:e], thresh[s:e].unsqueeze(1), out=chunk.view(e - s, G))
        sums.append(chunk.sum(dtype=torch.float64))
        mask[s * G:e * G].copy_(chunk)
    mask[n:n8] = False  # bytes of the last word beyond this block
    return int(torch.stack(sums).sum()) if sums else 0


def _selected_fraction_estimate(dist: torch.Tensor, thresh: torch.Tensor, scratch: torch.Tensor) -> float:
    """Fraction of entries with ``d <= thresh[row]`` on an evenly spread sample of rows (as many
    as ``scratch`` holds): decides, before any full pass, whether a block is ranked by counting."""
    B, G = dist.shape
    if B == 0 or G == 0:
        return 0.0
    every = -(-B // max(1, scratch.numel() // G))
    sample = dist[::every]
    out = scratch[: sample.numel()].view(sample.shape)
    torch.le(sample, thresh[::every].unsqueeze(1), out=out)
    return float(out.sum(dtype=torch.float64)) / out.numel()


def _mask_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending positions of the True entries among the first ``n`` of the flat ``mask``.

    The mask is scanned as 64-bit words, 8 entries at a time, and only the few non-zero
    words are expanded (``nonzero`` over the whole bool block costs as much as the comparison).
    """
    n8 = -(-n // 8) * 8
    words = mask[:n8].view(torch.int64).nonzero().squeeze(1)
    cand = (words.unsqueeze(1) * 8 + torch.arange(8, device=mask.device)).reshape(-1)
    return cand[mask[cand]]


def _select_flat(dist: torch.Tensor, thresh: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]
                 ) -> torch.Tensor:
    """Ascending flat positions of the entries of ``dist`` (B, G) with ``d <= thresh[row]``."""
    _select_mask(dist, thresh, buffers)
    return _mask_positions(buffers[1], dist.numel())


def _select_buffers(rows: int, num_cols: int, dtype: torch.dtype, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reusable buffers for ``_select_flat`` (and the counting path) on blocks of up to ``rows`` rows."""
    scratch = max(2 * num_cols, min(rows * num_cols, SELECT_SCRATCH_ELEMS))
    n8 = -(-rows * num_cols // 8) * 8
    return (torch.empty(scratch, dtype=dtype, device=device), torch.empty(n8, dtype=torch.bool, device=device))


def _ordered_keys(vals: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) ordered like the float32 ``vals`` (-0.0 equal to +0.0)."""
    bits = (vals + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    return bits.long() + (1 << 31)


def _lex_order(rows: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Stable permutation sorting entries by (row, value): equal values keep their input order.

    float32: one sort of (row, value) packed into int64; otherwise two stable sorts.
    """
    if vals.dtype == torch.float32:
        return torch.sort((rows << 32) | _ordered_keys(vals), stable=True).indices
    order = torch.sort(vals, stable=True).indices  # by value, ties in input order
    return order[torch.sort(rows[order], stable=True).indices]  # then grouped by row


def _ranked_matches_sparse(rows: torch.Tensor, vals: torch.Tensor, good: torch.Tensor, num_rows: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and 0-based in-band positions of the true matches, in ranked order (small bands).

    ``rows``/``vals``/``good`` describe the band entries in row-major order (columns
    ascending within a row); they are sorted stably by (row, value), so ties stay in
    gallery order.
    """
    order = _lex_order(rows, vals)
    rows, good = rows.index_select(0, order), good.index_select(0, order)
    counts = torch.bincount(rows, minlength=num_rows)
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    return rows[good], pos[good]


def _exclusive_in_row(flags: torch.Tensor, row_start: torch.Tensor) -> torch.Tensor:
    """For entries grouped by row: how many earlier entries of the same row have ``flags`` set."""
    f = flags.long()
    before = torch.cumsum(f, 0) - f
    return before - before[row_start]


def _ranked_matches_counted(dist: torch.Tensor, pr: torch.Tensor, pc: torch.Tensor, is_junk: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and 1-based ranks (among kept entries) of the true matches, in ranked order, by counting.

    For wide bands (weak models, occlusion, cross-domain: the farthest true match lies deep
    in the row): the rank of true match j with distance p is 1 + #{d_k < p} + #{k < j:
    d_k = p} - #{removed k ordered before j}. The first term is counted for all true matches
    of a few rows at once: one broadcast comparison (rows x matches x gallery) into a scratch
    of COUNT_SCRATCH_ELEMS, summed over the gallery; a second one with ``<=`` finds the true
    matches that have an exact tie, and only for those the entries equal to p before column j
    are counted. Rows are taken in decreasing number of true matches, so the rows of one
    comparison have about as many. The removed entries (same pid and camera) are few and
    counted from the sorted same-pid pairs.
    ``pr``/``pc``: the (row, column) of every same-pid entry, row-major; ``is_junk``: removed.
    """
    B, G = dist.shape
    dev = dist.device
    vals = dist.view(-1).index_select(0, pr * G + pc)
    order = _lex_order(pr, vals)  # pairs come column-ascending per row: ties stay in gallery order
    rows, cols, vals, junk = pr[order], pc[order], vals[order], is_junk[order]
    counts = torch.bincount(rows, minlength=B)
    row_start = (torch.cumsum(counts, 0) - counts)[rows]
    junk_before = _exclusive_in_row(junk, row_start)
    good = ~junk
    rows, cols, vals, junk_before = rows[good], cols[good], vals[good], junk_before[good]
    m = torch.bincount(rows, minlength=B)
    slot = torch.arange(rows.numel(), device=dev) - (torch.cumsum(m, 0) - m)[rows]
    width = int(m.max()) if B else 0
    # sums of 0/1 values: exact in float32 below 2^24 columns, float64 otherwise
    acc = torch.float32 if dist.dtype == torch.float32 and G < (1 << 24) else torch.float64
    by_m = torch.argsort(m, descending=True, stable=True)
    m_sorted = m[by_m].tolist()
    place = torch.argsort(by_m)[rows]  # each true match's row, as its place in by_m
    thr = torch.zeros((B, width), dtype=dist.dtype, device=dev)   # unused slots compare with 0, never read
    thr[place, slot] = vals
    lt = torch.zeros((B, width), dtype=acc, device=dev)
    le = torch.zeros((B, width), dtype=acc, device=dev)
    scratch = dist.new_empty(max(COUNT_SCRATCH_ELEMS, width * G))
    held_rows = max(1, min(B, COUNT_SCRATCH_ELEMS // max(1, G)))
    held_buf = dist.new_empty((held_rows, G))
    s = 0
    while s < B and m_sorted[s] > 0:
        w = m_sorted[s]  # the most true matches of these rows
        e = min(B, s + max(1, min(held_rows, scratch.numel() // (w * G))))
        held = torch.index_select(dist, 0, by_m[s:e], out=held_buf[: e - s]).unsqueeze(1)
        t = thr[s:e, :w].unsqueeze(2)
        cmp = scratch[: (e - s) * w * G].view(e - s, w, G)
        torch.lt(held, t, out=cmp)
        torch.sum(cmp, 2, dtype=acc, out=lt[s:e, :w])
        torch.le(held, t, out=cmp)
        torch.sum(cmp, 2, dtype=acc, out=le[s:e, :w])
        s = e
    n_less = lt[place, slot].long()
    ties = ((le[place, slot] - lt[place, slot]) > 1).nonzero().squeeze(1)  # equal to another entry
    tied_before = torch.zeros_like(n_less)
    col_idx = torch.arange(G, device=dev)
    step = max(1, scratch.numel() // max(1, 2 * G))
    for s in range(0, ties.numel(), step):
        t = ties[s:s + step]
        same = dist.index_select(0, rows[t]) == vals[t].unsqueeze(1)
        tied_before[t] = (same & (col_idx < cols[t].unsqueeze(1))).sum(1)
    return rows, n_less + tied_before - junk_before + 1


def _ranked_matches_listed(dist: torch.Tensor, mask: torch.Tensor, pair_pos: torch.Tensor, is_junk: torch.Tensor,
                           lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and 1-based ranks (among kept entries) of the true matches, in ranked order, from the
    list of selected entries (``mask``, see ``_select_mask``): narrow bands.

    Selected entries closer than the row's nearest true match (``lo``) are only counted;
    the others (the band) are sorted by (row, value, column).
    """
    B, G = dist.shape
    dev = dist.device
    flat = dist.view(-1)
    pos = _mask_positions(mask, flat.numel())
    rows, vals = pos // G, flat.index_select(0, pos)
    # mark the same-pid entries in the selected list: 1 = true match, 2 = removed
    kind = torch.zeros(pos.numel(), dtype=torch.uint8, device=dev)
    if pos.numel():
        slot = torch.searchsorted(pos, pair_pos).clamp_(max=pos.numel() - 1)
        found = pos.index_select(0, slot) == pair_pos
        kind[slot[found]] = 1 + is_junk[found].to(torch.uint8)
    kept = kind != 2
    below = vals < lo.index_select(0, rows)
    n_below = torch.zeros(B, dtype=torch.long, device=dev).index_add_(0, rows, (below & kept).long())
    band = (kept & ~below).nonzero().squeeze(1)
    rows, vals = rows.index_select(0, band), vals.index_select(0, band)
    good = kind.index_select(0, band) == 1
    g_rows, g_pos = _ranked_matches_sparse(rows, vals, good, B)
    return g_rows, n_below[g_rows] + g_pos + 1


def _block_stats(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    gallery: _PidGroups,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Per-query first-match rank, AP and INP for one block of queries (valid queries only),
    the block's number of queries, the counts of its dropped ones by reason and which are valid.

    The rank of a true match j among the kept gallery entries is 1 + the number of kept
    entries k ordered before it, (d_k, k) < (d_j, j). Only entries not farther than the
    query's farthest true match can precede one, so a single pass over the (contiguous)
    block marks them (``_select_mask``, with reused ``buffers``). When they are few (good
    features), everything after that works on their list: entries closer than the nearest
    true match are only counted, the band [nearest, farthest true match] is sorted. When
    they are many (DENSE_BAND_FRACTION), the ranks are counted instead
    (``_ranked_matches_counted``), which costs the same wherever the true matches fall.
    Same-pid entries are few per query and handled as sparse (row, column) pairs.
    """
    B, G = dist.shape
    dev = dist.device
    flat = dist.view(-1)
    pr, pc = gallery.same_pid_pairs(q_pids)
    is_junk = gallery.camids[pc] == q_camids[pr]  # same pid and same camera: removed
    pair_pos = pr * G + pc
    gr = pr[~is_junk]
    n_good = torch.bincount(gr, minlength=B)
    valid = n_good > 0

    g_dist = flat.index_select(0, pair_pos[~is_junk])
    inf = torch.full((B,), float("inf"), dtype=dist.dtype, device=dev)
    lo = inf.scatter_reduce(0, gr, g_dist, "amin", include_self=True)
    hi = (-inf).scatter_reduce(0, gr, g_dist, "amax", include_self=True)  # -inf: row selects nothing
    if buffers is None:
        buffers = _select_buffers(B, G, dist.dtype, dev)
    if (_selected_fraction_estimate(dist, hi, buffers[0]) > DENSE_BAND_FRACTION
            or _select_mask(dist, hi, buffers) > DENSE_BAND_FRACTION * flat.numel()):
        g_rows, rank = _ranked_matches_counted(dist, pr, pc, is_junk)
    else:
        g_rows, rank = _ranked_matches_listed(dist, buffers[1], pair_pos, is_junk, lo)
    hit_no = torch.arange(g_rows.numel(), device=dev) - (torch.cumsum(n_good, 0) - n_good)[g_rows] + 1

    n = n_good.double()
    ap = torch.zeros(B, dtype=torch.float64, device=dev).index_add_(0, g_rows, hit_no.double() / rank.double())
    first = torch.zeros(B, dtype=torch.long, device=dev).scatter_reduce_(0, g_rows, rank, "amin", include_self=False)
    last = torch.zeros(B, dtype=torch.long, device=dev).scatter_reduce_(0, g_rows, rank, "amax", include_self=False)
    return (first[valid], ap[valid] / n[valid], n[valid] / last[valid].double(), B,
            _dropped_reasons(q_pids, valid, pr), valid)


def _prepare_labels(q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, device: torch.device,
                    num_q: int, num_g: int) -> tuple[torch.Tensor, ...]:
    """Labels as 1-D tensors on ``device`` with their lengths checked."""
    out = tuple(_as_tensor(a, device).reshape(-1) for a in (q_pids, g_pids, q_camids, g_camids))
    for name, t, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), out, (num_q, num_g, num_q, num_g)):
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return out


def eval_func(
    distmat: torch.Tensor | np.ndarray,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    block_size: int | None = None,
    return_counts: bool = False,
) -> tuple[np.ndarray, float, float] | tuple[np.ndarray, float, float, QueryCounts]:
    """CMC[:max_rank], mAP and mINP of a (num_query, num_gallery) distance matrix.

    Returns ``(cmc, mAP, mINP)`` with ``cmc`` a float64 array of length ``max_rank``, and
    with ``return_counts`` a 4th item, the ``QueryCounts`` (queries evaluated, dropped and why).
    Raises ValueError when no query has a true match after the same-camera removal.
    """
    acc = _accumulate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, block_size)
    return (*acc.result(), acc.counts()) if return_counts else acc.result()


def per_query_ap(distmat: torch.Tensor | np.ndarray, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                 block_size: int | None = None) -> np.ndarray:
    """The AP of every query row of ``distmat`` as :func:`eval_func` computes it (its mAP is their
    mean over the evaluated queries); NaN for a query it leaves out (no true match left)."""
    acc = _accumulate(distmat, q_pids, g_pids, q_camids, g_camids, 1, block_size, keep_ap=True)
    assert acc.query_ap is not None
    return acc.query_ap


def _accumulate(distmat: torch.Tensor | np.ndarray, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                max_rank: int, block_size: int | None, keep_ap: bool = False) -> _Accumulator:
    """The statistics of a distance matrix, block by block (each query's AP too with ``keep_ap``)."""
    dist = _as_tensor(distmat)
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D, got shape {tuple(dist.shape)}")
    if not dist.is_floating_point():
        dist = dist.float()
    dist = dist.contiguous()
    num_q, num_g = dist.shape
    qp, gp, qc, gc = _prepare_labels(q_pids, g_pids, q_camids, g_camids, dist.device, num_q, num_g)
    acc, gallery = _Accumulator(max_rank, num_q if keep_ap else None), _PidGroups(gp, gc)
    rows = _rows_per_block(num_g, block_size)
    buffers = _select_buffers(min(rows, num_q), num_g, dist.dtype, dist.device)
    for s in range(0, num_q, rows):
        e = min(s + rows, num_q)
        acc.add(*_block_stats(dist[s:e], qp[s:e], qc[s:e], gallery, buffers))
    return acc


def evaluate(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    metric: str = "euclidean",
    block_size: int | None = None,
    return_counts: bool = False,
) -> tuple[np.ndarray, float, float] | tuple[np.ndarray, float, float, QueryCounts]:
    """Same as ``eval_func(distance(qf, gf), ...)`` without materialising the distance matrix.

    Fused: each block of query rows gets its distances (one GEMM into a reused buffer) and
    its metrics while the block is still in cache; the block is then overwritten by the next.
    """
    x, y, y_sq = _prepare_features(qf, gf, metric)
    num_q, num_g = x.shape[0], y.shape[0]
    qp, gp, qc, gc = _prepare_labels(q_pids, g_pids, q_camids, g_camids, x.device, num_q, num_g)
    acc, gallery = _Accumulator(max_rank), _PidGroups(gp, gc)
    rows = _rows_per_block(num_g, block_size)
    buf = x.new_empty((min(rows, num_q), num_g))
    buffers = _select_buffers(buf.shape[0], num_g, x.dtype, x.device)
    for s in range(0, num_q, rows):
        e = min(s + rows, num_q)
        dist = _distance_block_into(x[s:e], y, y_sq, buf[: e - s])
        acc.add(*_block_stats(dist, qp[s:e], qc[s:e], gallery, buffers))
    return (*acc.result(), acc.counts()) if return_counts else acc.result()


# ----------------------------------------------------------------------------- evaluator
def _spec_field(name: str, key: str) -> property:
    """A read-only attribute of the evaluator that is the field ``name`` of its ``spec``."""
    return property(lambda self: getattr(self.spec, name), doc=f"{key} of ``spec``.")


class R1_mAP_eval:
    """Accumulates (feature, pid, camid) batches; the first ``num_query`` rows are queries.

    ``compute()`` returns ``(cmc, mAP, mINP)``. The features are compared by ``spec``, a
    ``utils.distance.DistanceSpec``: L2-normalised only when ``feat_norm`` is true; k-reciprocal
    re-ranking (always on squared Euclidean distances, as published) only when ``reranking`` is
    true, otherwise ``metric`` applies.
    """

    # the distance settings, read from ``spec`` (the one place that holds them)
    feat_norm = _spec_field("feat_norm", "TEST.FEAT_NORM")
    reranking = _spec_field("re_ranking", "TEST.RE_RANKING")
    k1 = _spec_field("k1", "TEST.RE_RANKING_K1")
    k2 = _spec_field("k2", "TEST.RE_RANKING_K2")
    lambda_value = _spec_field("lambda_value", "TEST.RE_RANKING_LAMBDA")
    metric = _spec_field("dist_metric", "TEST.DIST_METRIC")

    def __init__(self, num_query: int, max_rank: int = 50, feat_norm: bool = True, reranking: bool = False,
                 k1: int = 20, k2: int = 6, lambda_value: float = 0.3, metric: str = "euclidean") -> None:
        self.spec = DistanceSpec(bool(feat_norm), metric, bool(reranking), int(k1), int(k2), float(lambda_value))
        self.num_query = int(num_query)
        self.max_rank = int(max_rank)
        self.reset()

    @classmethod
    def from_cfg(cls, cfg: Any, num_query: int) -> R1_mAP_eval:
        """Build from a config: its distance rule (``DistanceSpec.from_cfg``) and TEST.MAX_RANK."""
        evaluator = cls(num_query, max_rank=int(cfg.TEST.MAX_RANK))
        evaluator.spec = DistanceSpec.from_cfg(cfg)
        return evaluator

    def reset(self) -> None:
        """Forget all accumulated batches."""
        self.feats: list[torch.Tensor] = []
        self.pids: list[torch.Tensor] = []
        self.camids: list[torch.Tensor] = []

    def update(self, output: tuple[torch.Tensor, Sequence[int] | torch.Tensor, Sequence[int] | torch.Tensor]) -> None:
        """Add one batch ``(feat, pid, camid)``; feat is (B, D), pid/camid have B entries."""
        feat, pid, camid = output
        feat = feat.detach()
        self.feats.append(feat if feat.dim() == 2 else feat.reshape(feat.shape[0], -1))
        self.pids.append(_as_tensor(pid).reshape(-1).cpu())
        self.camids.append(_as_tensor(camid).reshape(-1).cpu())

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query features, gallery features) as used for the distances (normalised if asked)."""
        if not self.feats:
            raise ValueError("R1_mAP_eval.compute() called before any update()")
        feats = self.spec.features(torch.cat(self.feats, dim=0))
        if not 0 < self.num_query < feats.shape[0]:
            raise ValueError(f"num_query = {self.num_query} must lie in (0, {feats.shape[0]}) (rows seen)")
        return feats[: self.num_query], feats[self.num_query:]

    def compute(self, return_counts: bool = False
                ) -> tuple[np.ndarray, float, float] | tuple[np.ndarray, float, float, QueryCounts]:
        """CMC, mAP and mINP of the accumulated queries against the accumulated gallery
        (and the ``QueryCounts`` with ``return_counts``)."""
        qf, gf = self.features()
        pids, camids = torch.cat(self.pids), torch.cat(self.camids)
        nq = self.num_query
        labels = (pids[:nq], pids[nq:], camids[:nq], camids[nq:])
        if self.reranking:
            distmat = self.spec.re_rank(qf, gf)
            return eval_func(distmat, *labels, max_rank=self.max_rank, return_counts=return_counts)
        return evaluate(qf, gf, *labels, max_rank=self.max_rank, metric=self.metric, return_counts=return_counts)
