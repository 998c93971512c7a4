"""The project's one distance rule: how features are compared and ranked, wherever they are.

The evaluator (``utils.metrics.R1_mAP_eval``), the evaluation pictures, the folder search and the
gallery index (``retrieval/``) all compare features through a :class:`DistanceSpec`, the one
reader of the TEST distance settings (:meth:`DistanceSpec.from_cfg`), and the formula here:

* features: float32, L2-normalised first when TEST.FEAT_NORM is yes;
* TEST.DIST_METRIC ``euclidean``: the SQUARED euclidean distance ||x||^2 + ||y||^2 - 2 x.y, the
  norms summed first and then one GEMM (as the published code); not clamped at 0;
* TEST.DIST_METRIC ``cosine``: 1 - x.y of rows L2-normalised (again) here;
* TEST.RE_RANKING: k-reciprocal re-ranking (``utils.reranking``, on squared euclidean distances
  of the features, as published), which needs the whole query x gallery matrix;
* ranking: ascending distance, ties in gallery order (a stable sort by gallery index).

Everything runs in torch on the device of the inputs, in blocks of query rows, so memory stays
bounded by ``block_size`` rows of the (query x gallery) problem.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .run_dir import RunError
from .yesno import is_yes

__all__ = [
    "DistanceSpec",
    "check_finite_features",
    "euclidean_distance",
    "cosine_distance",
    "pairwise_distance",
    "squared_euclidean_pairs",
    "distance_blocks",
    "row_blocks",
    "ranking",
    "ranked_indices",
    "top_k_of_candidates",
]

# Number of (query x gallery) elements handled per block; 64 MB of float32. Fewer, larger
# blocks mean fewer GEMM calls and fewer small ops (measured faster than 16 or 32 MB on the
# shared 2-core machine).
DEFAULT_BLOCK_ELEMS = 1 << 24
_METRICS = ("euclidean", "cosine")


# ----------------------------------------------------------------------------- distances
def _rows_per_block(num_cols: int, block_size: int | None) -> int:
    """Rows per block: ``block_size`` if given, else as many as fit DEFAULT_BLOCK_ELEMS."""
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}")
        return int(block_size)
    return max(1, DEFAULT_BLOCK_ELEMS // max(1, num_cols))


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric = {metric!r} is not allowed; choose one of: {', '.join(map(repr, _METRICS))}")


def _sq_norms(x: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``x.pow(2).sum(dim=1)`` (bit for bit) in row chunks: no full-size temporary."""
    out = x.new_empty(x.shape[0])
    for s in range(0, x.shape[0], rows):
        torch.sum(x[s:s + rows].pow(2), dim=1, out=out[s:s + rows])
    return out


def _distance_block_into(x: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor | None, out: torch.Tensor
                         ) -> torch.Tensor:
    """Distances of the rows ``x`` to all of ``y``, written into ``out`` (a reused buffer).

    ``y_sq`` given: squared Euclidean ||x||^2 + ||y||^2 - 2 x.y, computed like the published
    code (the norms summed first, then one GEMM with beta=1, alpha=-2). Not clamped at 0:
    tiny negative values can occur for near-identical vectors; clamping would create
    artificial ties and change the ranking relative to the published code.
    ``y_sq`` None: 1 - x.y (cosine distance of rows already L2-normalised).
    Writing into a reused buffer matters: a fresh block of this size is a fresh mmap, and
    its page faults cost about as much as the GEMM that fills it.
    """
    if y_sq is None:
        torch.mm(x, y.t(), out=out)
        return out.neg_().add_(1.0)  # -p + 1 is exactly 1 - p
    torch.add(_sq_norms(x).unsqueeze(1), y_sq, out=out)
    return out.addmm_(x, y.t(), beta=1, alpha=-2)


def _prepare_features(x: torch.Tensor, y: torch.Tensor, metric: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, y, ||y||^2 or None) ready for ``_distance_block_into`` (cosine: rows normalised)."""
    _check_metric(metric)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected 2-D features of equal width, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point():
        x = x.float()
    y = y.to(device=x.device, dtype=x.dtype)
    if metric == "cosine":
        return F.normalize(x, dim=1), F.normalize(y, dim=1), None
    return x, y, _sq_norms(y)


def distance_blocks(
    x: torch.Tensor, y: torch.Tensor, metric: str = "euclidean", block_size: int | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, end, dist[start:end])`` row blocks of the x-vs-y distance matrix.

    metric: 'euclidean' = squared Euclidean; 'cosine' = 1 - cosine similarity (the rows are
    L2-normalised here, so for L2-normalised features euclidean = 2 * cosine).
    Each block is a fresh tensor; ``evaluate`` uses one reused buffer instead.
    """
    x, y, y_sq = _prepare_features(x, y, metric)
    rows = _rows_per_block(y.shape[0], block_size)
    for start in range(0, x.shape[0], rows):
        end = min(start + rows, x.shape[0])
        out = x.new_empty((end - start, y.shape[0]))
        yield start, end, _distance_block_into(x[start:end], y, y_sq, out)


def pairwise_distance(
    x: torch.Tensor, y: torch.Tensor, metric: str = "euclidean", block_size: int | None = None
) -> torch.Tensor:
    """Full (len(x), len(y)) distance matrix, filled block by block (bounded temporaries)."""
    x, y, y_sq = _prepare_features(x, y, metric)
    out = x.new_empty((x.shape[0], y.shape[0]))
    rows = _rows_per_block(y.shape[0], block_size)
    for start in range(0, x.shape[0], rows):
        end = min(start + rows, x.shape[0])
        _distance_block_into(x[start:end], y, y_sq, out[start:end])
    return out


def euclidean_distance(x: torch.Tensor, y: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Squared Euclidean distance matrix ||x_i - y_j||^2."""
    return pairwise_distance(x, y, "euclidean", block_size)


def cosine_distance(x: torch.Tensor, y: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Cosine distance matrix 1 - cos(x_i, y_j)."""
    return pairwise_distance(x, y, "cosine", block_size)


def squared_euclidean_pairs(x: torch.Tensor, y: torch.Tensor, x_sq: torch.Tensor, y_sq: torch.Tensor
                            ) -> torch.Tensor:
    """Squared euclidean distances of the row pairs (x[i], y[i]) given their squared norms:
    ||x||^2 + ||y||^2 - 2 x.y, this module's formula for pairs (re-ranking's distances off its lists)."""
    return x_sq + y_sq - 2 * (x * y).sum(dim=1)


def row_blocks(distmat: torch.Tensor | np.ndarray, rows: int = 256) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, block)`` slices of a full distance matrix."""
    d = torch.as_tensor(distmat)
    for s in range(0, d.shape[0], rows):
        yield s, min(s + rows, d.shape[0]), d[s:s + rows]


# ----------------------------------------------------------------------------- the tie order
def ranking(dist: torch.Tensor) -> torch.Tensor:
    """Column indices of each row of ``dist`` by ascending distance, ties in column (gallery) order."""
    return torch.sort(dist, dim=1, stable=True).indices


def ranked_indices(distmat: torch.Tensor | np.ndarray) -> np.ndarray:
    """:func:`ranking` of a distance matrix as a numpy array."""
    return ranking(torch.as_tensor(distmat)).cpu().numpy()


def top_k_of_candidates(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest of each row of candidate lists (distances ``dist`` of gallery entries
    ``ids``, in any order; ids < 0 are absent entries), ascending, ties by gallery index: the order
    :func:`ranking` gives a full row."""
    dist = np.where(ids < 0, np.inf, dist)
    big = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((big, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1).astype(np.float32), np.take_along_axis(ids, order, 1)


# ----------------------------------------------------------------------------- what can be compared
def check_finite_features(feats: torch.Tensor | np.ndarray, what: str,
                          cause: str = "the model's weights are not finite (a diverged run or a damaged checkpoint)",
                          outcome: str = "no metrics computed") -> None:
    """Refuse (N, D) features holding NaN/Inf: they would give a meaningless ranking that looks like
    a result. ``what`` names the features in the one-line error (evaluation, a feature file, ...)."""
    bad = int((~torch.isfinite(torch.as_tensor(feats)).all(dim=1)).sum())
    if bad:
        raise RunError(f"{what}: {bad} of {len(feats)} features hold NaN/Inf — {cause}; {outcome}")


# ----------------------------------------------------------------------------- the settings
@dataclass(frozen=True)
class DistanceSpec:
    """How features are compared: TEST.FEAT_NORM, TEST.DIST_METRIC ('euclidean' or 'cosine') and
    TEST.RE_RANKING with its k1, k2 and lambda. Every comparison of the project goes through one."""

    feat_norm: bool = True
    dist_metric: str = "euclidean"
    re_ranking: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        _check_metric(self.dist_metric)

    @classmethod
    def from_cfg(cls, cfg: Any) -> DistanceSpec:
        """The distance settings of a config's TEST section (the only place that reads them)."""
        t = cfg.TEST
        return cls(is_yes(t.FEAT_NORM), str(t.DIST_METRIC), is_yes(t.RE_RANKING), int(t.RE_RANKING_K1),
                   int(t.RE_RANKING_K2), float(t.RE_RANKING_LAMBDA))

    @property
    def name(self) -> str:
        """How the distances are computed, for captions and JSON."""
        if self.re_ranking:
            return "re-ranked (k-reciprocal)"
        return "squared euclidean" if self.dist_metric == "euclidean" else "cosine distance"

    def as_dict(self) -> dict[str, Any]:
        """FEAT_NORM, the metric and the name (what an index folder records; re-ranking is not indexable)."""
        return {"feat_norm": self.feat_norm, "dist_metric": self.dist_metric, "distance": self.name}

    def features(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Features as they are compared: float32, L2-normalised when FEAT_NORM."""
        t = torch.as_tensor(x).float()
        return F.normalize(t, dim=1) if self.feat_norm else t

    def prepare(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Vectors the formula compares without further normalisation: :meth:`features`, then the
        cosine metric's own normalisation (what a gallery index stores)."""
        t = self.features(x)
        return F.normalize(t, dim=1) if self.dist_metric == "cosine" else t

    def re_rank(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The k-reciprocal re-ranked (query x gallery) matrix of features already through :meth:`features`."""
        from .reranking import re_ranking
        return re_ranking(q, g, k1=self.k1, k2=self.k2, lambda_value=self.lambda_value)

    def matrix(self, q: torch.Tensor | np.ndarray, g: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The full query x gallery distance matrix, re-ranked when asked: what the evaluation ranks."""
        q, g = self.features(q), self.features(g)
        if self.re_ranking:
            return self.re_rank(q, g)
        return pairwise_distance(q, g, self.dist_metric)

    def blocks(self, q: torch.Tensor | np.ndarray, g: torch.Tensor | np.ndarray
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, end, rows)`` blocks of :meth:`matrix`: in bounded memory, except that re-ranking
        needs (and slices) the full matrix."""
        if self.re_ranking:
            return row_blocks(self.matrix(q, g))
        return distance_blocks(self.features(q), self.features(g), self.dist_metric)

    def prepared_distances(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Distances (len(q), len(g)) of vectors :meth:`prepare` gave, by the formula (no normalisation here)."""
        out = q.new_empty((q.shape[0], g.shape[0]))
        return _distance_block_into(q, g, _sq_norms(g) if self.dist_metric == "euclidean" else None, out)

    def candidate_distances(self, q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Distances (b, c) of prepared queries ``q`` (b, d) to their own prepared candidates ``cand``
        (b, c, d): the formula batched per query, 1 - q.g or |q|^2 + |g|^2 - 2 q.g (not clamped)."""
        dot = torch.bmm(cand, q.unsqueeze(2)).squeeze(2)
        if self.dist_metric == "cosine":
            return dot.neg_().add_(1.0)
        return (q.pow(2).sum(dim=1).unsqueeze(1) + cand.pow(2).sum(dim=2)).add_(dot, alpha=-2)

    def from_squared_l2(self, d: np.ndarray) -> np.ndarray:
        """The distance of prepared vectors from their squared L2 distance (what an L2 index reports):
        itself for euclidean, half of it for cosine (unit vectors: |q - g|^2 = 2 - 2 cos)."""
        return d / 2 if self.dist_metric == "cosine" else d
