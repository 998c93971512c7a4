"""A gallery index built once and searched many times (faiss): parameters, build, search, recall.

Distances are the project's one rule (``utils.distance.DistanceSpec``, without re-ranking):

* ``TEST.DIST_METRIC cosine``: 1 - cos of L2-normalised features;
* ``TEST.DIST_METRIC euclidean``: the SQUARED euclidean distance, of L2-normalised features when
  ``TEST.FEAT_NORM`` is yes, else of the raw features.

Kinds:

* ``flat``: exact. ``IndexFlatIP`` on normalised features (cosine) or ``IndexFlatL2`` (euclidean);
  the float32 gallery is held in memory.
* ``ivf-pq``: approximate, for galleries that do not fit in memory. An inverted file of ``nlist``
  lists over product-quantised codes (``m`` sub-quantisers of ``nbits`` bits; L2 on the prepared
  vectors, which ranks as the inner product does when they are normalised); ``nprobe`` lists are
  scanned per query. With ``refine`` R > 0 the R x k best candidates are re-ranked exactly from
  the prepared vectors, kept on disk as a float16 ``.npy`` (memory-mapped, never loaded whole).

Every kind reports distances computed by the project's formula from the stored vectors (flat:
float32, exact; ivf-pq with refine: float16-rounded; ivf-pq without refine: the PQ estimate),
sorted ascending with ties in gallery order, the project's ranking (``utils.distance``).
Re-ranking (``TEST.RE_RANKING``) needs the whole query x gallery matrix and is refused.

The index on disk (a folder written crash-safely, read back) is ``retrieval.index_store``.

faiss is the package's ``index`` extra: it is imported where an index is built, searched or read, so
this module (its parameters, its exact search) loads without it, and a missing faiss is one line
naming the extra to install.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from config import ConfigError
from processor.progress import progress
from utils.checkpoint import file_sha256
from utils.distance import DistanceSpec, ranking, top_k_of_candidates
from utils.errors import UserError, import_extra

logger = logging.getLogger("svllreid")

__all__ = ["KINDS", "metric_from_config", "choose_params", "default_kind", "Items", "GalleryIndex", "prepare",
           "build_index", "search", "exact_search", "ExactTopK", "gather_rows", "recall_at_k", "recall_against",
           "measure_recall", "check_compatible"]

KINDS = ("flat", "ivf-pq")

TRAIN_CAP = 1_000_000      # training vectors at most (float32: 4 GB at 1024-d)
MIN_POINTS = 39            # faiss's k-means wants at least 39 training points per centroid
MAX_NLIST = 65536
SUB_DIM = 40               # target dimensions per PQ sub-quantiser (1280 -> m 32)
BLOCK_ELEMS = 1 << 24      # float32 elements per working block (64 MB)


# ----------------------------------------------------------------------------- metric
def metric_from_config(cfg: Any) -> DistanceSpec:
    """The distance rule of a config for an index (``DistanceSpec.from_cfg``); TEST.RE_RANKING is
    refused (it needs the full distance matrix)."""
    spec = DistanceSpec.from_cfg(cfg)
    if spec.re_ranking:
        raise ConfigError("TEST.RE_RANKING True: k-reciprocal re-ranking needs the whole query x gallery distance "
                          "matrix, which an index does not compute; set TEST.RE_RANKING False, or search the "
                          "features with --gallery")
    return spec


def prepare(x: np.ndarray | torch.Tensor, metric: DistanceSpec) -> np.ndarray:
    """Float32 C-contiguous vectors as the project compares them (``DistanceSpec.prepare``), so the
    index holds the numbers the evaluation's formula sees."""
    if isinstance(x, np.ndarray):    # a read-only (memory-mapped) array is copied: torch wants writable memory
        x = np.ascontiguousarray(x, dtype=np.float32) if x.flags.writeable else np.array(x, dtype=np.float32)
    return np.ascontiguousarray(metric.prepare(x).cpu().numpy(), dtype=np.float32)


# ----------------------------------------------------------------------------- parameters
def _threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _divisors(d: int) -> list[int]:
    return [m for m in range(1, d + 1) if d % m == 0]


def _pq_m(d: int) -> int:
    """The number of PQ sub-quantisers: a divisor of ``d`` giving about SUB_DIM dimensions each, and
    at least 8 where ``d`` allows (narrow features would otherwise get one or two coarse codes)."""
    return min((m for m in _divisors(d) if m >= min(8, d)), key=lambda m: (abs(d / m - SUB_DIM), -m))


def choose_params(n: int, d: int, kind: str, *, nlist: int | None = None, m: int | None = None,
                  nbits: int | None = None, nprobe: int | None = None, refine: int | None = None,
                  train_size: int | None = None, threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Build and search parameters for ``n`` vectors of width ``d``, from the size unless given.

    ivf-pq: nlist ~ sqrt(n) (at most n / 39, so k-means has 39 points per list, and 65536);
    train_size 64 x nlist (at least 9984 for the 256-centroid PQ codebooks, at most n and 1M);
    m: the divisor of d nearest d / 40, at least 8 (1280 -> 32); nbits 8 (fewer when the training sample
    cannot fill 256 centroids); nprobe ~ nlist / 8 (at least 16); refine 10 (re-rank 10 x k
    candidates exactly; 0: none). bench/gallery_index.py measures these at 100k and 1M (recall@10
    0.99 at 1M); the denser 4 sqrt(n) lists and 64 codes cost minutes more k-means and encoding
    on a small machine for no recall the re-ranking does not already give.
    threads (of the build; a search uses its machine's): OMP_NUM_THREADS,
    else the usable cores.
    A given value out of range is refused in one line naming it.
    """
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if n < 1:
        raise UserError("the gallery is empty (0 features): nothing to index")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads {threads}: expected a positive number")
    base: dict[str, Any] = {"kind": kind, "add_batch": max(1, BLOCK_ELEMS // max(1, d)),
                            "threads": int(threads or _threads())}
    if kind == "flat":
        given = {k: v for k, v in dict(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, refine=refine,
                                       train_size=train_size).items() if v is not None}
        if given:
            raise ConfigError(f"--{next(iter(given))} applies to --kind ivf-pq only (flat is exact and has no "
                              "parameters)")
        return base
    if n < 2:
        raise ConfigError(f"--kind ivf-pq needs at least 2 gallery images to train on (the gallery has {n}); "
                          "use --kind flat")
    cap = min(n, TRAIN_CAP)
    if nlist is None:
        nlist = int(min(max(1, round(math.sqrt(n))), max(1, cap // MIN_POINTS), MAX_NLIST))
    elif not 1 <= nlist <= n:
        raise ConfigError(f"--nlist {nlist}: expected 1 to the gallery size {n}")
    if train_size is None:
        train_size = int(min(cap, max(64 * nlist, MIN_POINTS * 256)))
    elif not nlist <= train_size <= n:
        raise ConfigError(f"train_size {train_size}: expected nlist {nlist} to the gallery size {n}")
    train_size = max(train_size, nlist)
    if m is None:
        m = _pq_m(d)
    elif m < 1 or d % m:
        near = sorted(_divisors(d), key=lambda x: abs(x - m))[:3]
        raise ConfigError(f"--m {m}: the number of PQ sub-quantisers must divide the feature width {d} "
                          f"(e.g. {', '.join(map(str, sorted(near)))})")
    if nbits is None:
        nbits = int(min(8, max(1, math.floor(math.log2(max(2, train_size // MIN_POINTS))))))
    elif not 1 <= nbits <= 16 or 2 ** nbits > train_size:
        raise ConfigError(f"nbits {nbits}: expected 1 to 16 with 2**nbits <= the training sample {train_size}")
    if nprobe is None:
        nprobe = int(min(nlist, max(16, nlist // 8)))
    elif not 1 <= nprobe <= nlist:
        raise ConfigError(f"--nprobe {nprobe}: expected 1 to nlist {nlist}")
    if refine is None:
        refine = 10
    elif refine < 0:
        raise ConfigError(f"--refine {refine}: expected 0 (no exact re-ranking) or a positive factor")
    return {**base, "nlist": int(nlist), "m": int(m), "nbits": int(nbits), "nprobe": int(nprobe),
            "refine": int(refine), "train_size": int(train_size), "seed": int(seed)}


def _memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1024 or unit == "TB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return f"{b:.1f} TB"


def default_kind(n: int, d: int, memory_bytes: int | None = None) -> tuple[str, str]:
    """(kind, reason): flat when the float32 gallery takes at most a quarter of the memory, else ivf-pq."""
    mem = _memory_bytes() if memory_bytes is None else int(memory_bytes)
    need = 4 * n * d
    if mem and need > mem // 4:
        return "ivf-pq", (f"the float32 gallery of {_size(need)} is more than a quarter of this machine's memory "
                          f"of {_size(mem)}: approximate ivf-pq")
    return "flat", (f"the float32 gallery of {_size(need)} fits comfortably in this machine's memory "
                    f"of {_size(mem) if mem else 'unknown size'}: exact flat")


# ----------------------------------------------------------------------------- vectors in parts
class _Rows:
    """(n, d) vectors held as one array or a sequence of parts (memory-mapped arrays welcome),
    read in row slices: nothing is concatenated."""

    def __init__(self, features: np.ndarray | Sequence[np.ndarray]) -> None:
        parts = [features] if isinstance(features, (np.ndarray, torch.Tensor)) else list(features)
        parts = [p.numpy() if isinstance(p, torch.Tensor) else p for p in parts]
        if not parts:
            raise UserError("the gallery is empty (no feature parts): nothing to index")
        widths = {p.shape[1] if p.ndim == 2 else -1 for p in parts}
        if len(widths) != 1 or -1 in widths:
            raise UserError(f"feature parts of different widths or not 2-D: "
                            f"{', '.join(str(tuple(p.shape)) for p in parts)}")
        self.parts = parts
        self.d = widths.pop()
        self.offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        self.n = int(self.offsets[-1])

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows as float32) in order, at most ``rows`` at a time."""
        for p, off in zip(self.parts, self.offsets):
            for s in range(0, p.shape[0], rows):
                yield int(off) + s, np.asarray(p[s:s + rows], dtype=np.float32)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (sorted ascending) as float32."""
        out = np.empty((len(idx), self.d), dtype=np.float32)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            out[sel] = self.parts[j][idx[sel] - self.offsets[j]]
        return out


def _check_finite(x: np.ndarray, start: int) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UserError(f"gallery feature {start + int(np.flatnonzero(bad)[0])} (and {int(bad.sum()) - 1} more in "
                        "its block) holds NaN/Inf: the model that wrote it was not finite; nothing indexed")


# ----------------------------------------------------------------------------- the index
@dataclass
class Items:
    """What each indexed vector is: its image (``root`` + relative path) and labels (-1 = unknown)."""

    paths: np.ndarray | Sequence[str]
    pids: np.ndarray
    camids: np.ndarray
    root: str = ""

    def __len__(self) -> int:
        return len(self.pids)

    def path(self, i: int) -> str:
        """The full path of item ``i``."""
        return os.path.join(self.root, str(self.paths[i]))


@dataclass
class GalleryIndex:
    """A built or loaded index: the faiss index, how it compares, what it holds."""

    index: Any                                   # faiss.Index
    metric: DistanceSpec
    params: dict[str, Any]
    vectors: np.ndarray | None = None            # (n, d) float16 prepared vectors (ivf-pq with refine)
    items: Items | None = None
    model: dict[str, Any] = field(default_factory=dict)
    junk_left_out: int = 0
    info: dict[str, Any] = field(default_factory=dict)   # index.json as read (empty for a fresh build)
    path: str = ""

    @property
    def kind(self) -> str:
        return str(self.params["kind"])

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)


def _new_index(d: int, metric: DistanceSpec, params: dict[str, Any]) -> Any:
    faiss = import_extra("faiss", "index")
    if params["kind"] == "flat":
        return faiss.IndexFlatIP(d) if metric.dist_metric == "cosine" else faiss.IndexFlatL2(d)
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFPQ(quantizer, d, int(params["nlist"]), int(params["m"]), int(params["nbits"]),
                             faiss.METRIC_L2)
    for cp in (index.cp, index.pq.cp):     # the sizes are chosen (and stated) knowingly: no faiss warnings
        cp.seed = int(params.get("seed", 0))
        cp.min_points_per_centroid = 1
    index.nprobe = int(params["nprobe"])
    return index


def _stores_vectors(params: dict[str, Any]) -> bool:
    return params["kind"] == "ivf-pq" and int(params.get("refine", 0)) > 0


def build_index(features: np.ndarray | Sequence[np.ndarray], metric: DistanceSpec, params: dict[str, Any], *,
                vectors_path: str | None = None,
                on_chunk: Callable[[int, np.ndarray], None] | None = None) -> GalleryIndex:
    """Build an index of ``features`` (raw features, as extracted: one (n, d) array or parts of one,
    memory-mapped arrays welcome) in chunks: ivf-pq is trained on a random sample of ``train_size``
    rows, then every kind gets the vectors ``add_batch`` rows at a time.

    ivf-pq with refine keeps the prepared vectors as float16: in the ``.npy`` file ``vectors_path``
    (memory-mapped), or in memory without it. ``on_chunk(first row, prepared rows)`` sees every
    chunk as it is added (an exact search riding on the same pass). Progress bar; NaN/Inf features
    are refused.
    """
    rows = _Rows(features)
    if rows.n == 0:
        raise UserError("the gallery is empty (0 features): nothing to index")
    d = rows.d
    faiss = import_extra("faiss", "index")
    faiss.omp_set_num_threads(int(params.get("threads") or _threads()))
    index = _new_index(d, metric, params)
    if params["kind"] == "ivf-pq":
        size = min(int(params["train_size"]), rows.n)
        rng = np.random.default_rng(int(params.get("seed", 0)))
        sample = np.sort(rng.choice(rows.n, size=size, replace=False))
        x = rows.take(sample)
        _check_finite(x, 0)
        logger.info("Training ivf-pq (%d lists, %d x %d-bit codes) on %d random gallery vectors", params["nlist"],
                    params["m"], params["nbits"], size)
        nlist, codes = int(params["nlist"]), 2 ** int(params["nbits"])
        if size < MIN_POINTS * max(nlist, codes):
            helps = ("a smaller --nlist helps" if nlist >= codes else
                     f"the {codes} centroids are those of each {params['nbits']}-bit code book: this gallery is too "
                     "small for ivf-pq, use --kind flat")
            logger.warning("%d training vectors for %d centroids: fewer than the %d per centroid k-means wants; the "
                           "lists and codes are coarse (%s)", size, max(nlist, codes), MIN_POINTS, helps)
        index.train(prepare(x, metric))
        del x
    vectors: np.ndarray | None = None
    writer: _NpyWriter | None = None
    if _stores_vectors(params):
        if vectors_path:
            writer = _NpyWriter(vectors_path, (rows.n, d), np.float16)
        else:
            vectors = np.empty((rows.n, d), dtype=np.float16)
    batch = int(params.get("add_batch") or max(1, BLOCK_ELEMS // d))
    total = sum(-(-p.shape[0] // batch) for p in rows.parts)
    with writer or _nothing():
        for start, chunk in progress(rows.chunks(batch), total, f"adding {rows.n} vectors ({params['kind']})"):
            _check_finite(chunk, start)
            x = prepare(chunk, metric)
            index.add(x)
            if on_chunk is not None:
                on_chunk(start, x)
            if writer is not None:
                writer.write(x)
            elif vectors is not None:
                vectors[start:start + len(x)] = x.astype(np.float16)
    if writer is not None:
        vectors = np.load(vectors_path, mmap_mode="r")
    return GalleryIndex(index, metric, dict(params), vectors)


# ----------------------------------------------------------------------------- search
def _flat_vectors(gi: GalleryIndex) -> np.ndarray:
    """The float32 vectors an IndexFlat holds (a view, no copy)."""
    faiss = import_extra("faiss", "index")
    index = faiss.downcast_index(gi.index)
    return faiss.rev_swig_ptr(index.get_xb(), gi.n * gi.d).reshape(gi.n, gi.d)


def _rescore(gi: GalleryIndex, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact distances of the candidates (from the stored vectors), the best ``k`` kept."""
    source = _flat_vectors(gi) if gi.kind == "flat" else gi.vectors
    assert source is not None
    c = cand.shape[1]
    step = max(1, BLOCK_ELEMS // max(1, c * gi.d))
    dists, ids = [], []
    for s in range(0, len(q), step):
        cb = cand[s:s + step]
        valid = np.where(cb < 0, 0, cb)
        uniq, inv = np.unique(valid, return_inverse=True)
        g = torch.from_numpy(np.asarray(source[uniq], dtype=np.float32))[torch.from_numpy(inv.reshape(-1))]
        dist = gi.metric.candidate_distances(torch.from_numpy(q[s:s + step]), g.view(len(cb), c, gi.d)).numpy()
        d_k, i_k = top_k_of_candidates(dist, cb, k)
        dists.append(d_k)
        ids.append(i_k)
    return np.concatenate(dists), np.concatenate(ids)


def search(gi: GalleryIndex, queries: np.ndarray | torch.Tensor, k: int, *, nprobe: int | None = None,
           refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances (nq, k) float32, gallery indices (nq, k) int64) of raw query features, ascending by
    distance, ties in gallery order. ``nprobe`` / ``refine`` override the index's (ivf-pq)."""
    n = gi.n
    if k < 1:
        raise ConfigError(f"--topk {k}: give a positive number of gallery entries")
    if k > n:
        raise ConfigError(f"--topk {k} is more than the {n} images of the index {gi.path or ''}".rstrip() +
                          f"; give --topk {n} or less")
    q = prepare(queries, gi.metric)
    if q.ndim != 2 or q.shape[1] != gi.d:
        raise ConfigError(f"queries of shape {tuple(q.shape)}: the index holds {gi.d}-d vectors")
    if len(q) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    faiss = import_extra("faiss", "index")
    faiss.omp_set_num_threads(_threads())     # this machine's cores, not those of the machine that built it
    if gi.kind == "flat":
        c = min(n, 2 * k + 8)
        _, cand = gi.index.search(q, c)
        return _rescore(gi, q, cand, k)
    ivf = faiss.extract_index_ivf(gi.index)
    nlist = int(ivf.nlist)
    probe = int(nprobe if nprobe is not None else gi.params["nprobe"])
    if not 1 <= probe <= nlist:
        raise ConfigError(f"--nprobe {probe}: expected 1 to nlist {nlist}")
    factor = int(refine if refine is not None else gi.params.get("refine", 0))
    if factor > 0 and gi.vectors is None:
        raise ConfigError(f"refine {factor}: the index {gi.path} keeps no vectors to re-rank with (built with "
                          "--refine 0)")
    c = min(n, max(k, factor * k)) if factor > 0 else k
    dist, cand = gi.index.search(q, c, params=faiss.SearchParametersIVF(nprobe=probe))
    short = (cand < 0).any(axis=1)
    if short.any():    # too few vectors in the probed lists: those queries scan every list
        d2, c2 = gi.index.search(q[short], c, params=faiss.SearchParametersIVF(nprobe=nlist))
        dist[short], cand[short] = d2, c2
    if factor > 0:
        return _rescore(gi, q, cand, k)
    return top_k_of_candidates(gi.metric.from_squared_l2(dist), cand, k)


def _candidates(dist: torch.Tensor, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of each row of a block of distances (gallery rows ``start ..``) that can be in
    the row's top-``k``: all those not above its k-th smallest value, ties at it included, in
    gallery order, as (distances, gallery indices) padded on the right with +inf.

    A top-k of the values and a mask cost far less than sorting the whole block; sorting the
    few candidates after the best so far (stably) then gives what sorting everything would."""
    n_q, n = dist.shape
    if n <= k:
        return dist, torch.arange(start, start + n).expand(n_q, -1)
    kth = dist.topk(k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    mask = dist <= kth
    counts = mask.sum(1)
    rows, cols = mask.nonzero(as_tuple=True)                  # row by row, columns ascending
    pos = torch.arange(len(rows)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    width = int(counts.max())
    cand_d = torch.full((n_q, width), float("inf"), dtype=dist.dtype)
    cand_i = torch.full((n_q, width), -1, dtype=torch.int64)
    cand_d[rows, pos] = dist[rows, cols]
    cand_i[rows, pos] = cols + start
    return cand_d, cand_i


class ExactTopK:
    """The exact top-``k`` of prepared ``queries`` over gallery rows given chunk by chunk, in order
    (:meth:`add`), in bounded memory; ties keep gallery order."""

    def __init__(self, queries: np.ndarray, metric: DistanceSpec, k: int) -> None:
        self.q, self.metric, self.k = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), metric, k
        self.best_d = torch.full((len(self.q), 0), float("inf"))
        self.best_i = torch.zeros((len(self.q), 0), dtype=torch.int64)

    def add(self, start: int, chunk: np.ndarray) -> None:
        """Gallery rows ``start ..`` (prepared), in blocks of bounded size."""
        step = max(self.k, BLOCK_ELEMS // max(1, len(self.q)))
        for s in range(0, len(chunk), step):
            g = torch.from_numpy(np.ascontiguousarray(chunk[s:s + step], dtype=np.float32))
            dist = self.metric.prepared_distances(self.q, g)
            cand_d, cand_i = _candidates(dist, start + s, self.k)
            all_d, all_i = torch.cat([self.best_d, cand_d], 1), torch.cat([self.best_i, cand_i], 1)
            order = ranking(all_d)[:, :self.k]       # ties keep gallery order
            self.best_d, self.best_i = all_d.gather(1, order), all_i.gather(1, order)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(distances, gallery indices) of the rows added so far."""
        return self.best_d.numpy(), self.best_i.numpy()


def gather_rows(features: np.ndarray | Sequence[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (sorted ascending) of an array or of parts of one, as float32."""
    return _Rows(features).take(np.asarray(ids, dtype=np.int64))


def exact_search(features: np.ndarray | Sequence[np.ndarray], metric: DistanceSpec, queries: np.ndarray | torch.Tensor,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` of raw ``queries`` over raw ``features`` (an array or parts; memory-mapped
    welcome), block by block in bounded memory: the reference an approximate index is measured against."""
    rows = _Rows(features)
    acc = ExactTopK(prepare(queries, metric), metric, min(k, rows.n))
    for start, chunk in rows.chunks(max(1, BLOCK_ELEMS // max(1, rows.d))):
        acc.add(start, prepare(chunk, metric))
    return acc.result()


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """The fraction of the exact top-``k`` found in the approximate top-``k`` (mean over queries)."""
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    if len(e) == 0:
        return float("nan")
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / max(1, len(y)) for x, y in zip(a, e)]))


def recall_against(gi: GalleryIndex, query_ids: np.ndarray, queries: np.ndarray, exact_ids: np.ndarray,
                   ks: Sequence[int] = (1, 10)) -> dict[str, Any]:
    """Recall@k of ``gi`` for gallery rows ``query_ids`` (raw ``queries``) used as queries, against
    their exact lists ``exact_ids`` (at least max(ks) + 1 long): each query's own entry is left out
    of both lists (it would be an easy first hit)."""
    kmax = min(max(ks), gi.n - 1, exact_ids.shape[1] - 1)
    if kmax < 1 or len(query_ids) == 0:
        return {"queries": 0}
    _, approx = search(gi, queries, kmax + 1)

    def others(lists: np.ndarray) -> np.ndarray:
        return np.stack([row[row != i][:kmax] for row, i in zip(lists[:, :kmax + 1], query_ids)])
    a, e = others(approx), others(exact_ids)
    return {"queries": int(len(query_ids)), **{f"recall@{k}": recall_at_k(a, e, min(k, kmax)) for k in ks}}


def measure_recall(gi: GalleryIndex, features: np.ndarray | Sequence[np.ndarray], num_queries: int,
                   ks: Sequence[int] = (1, 10), seed: int = 0) -> dict[str, Any]:
    """Recall@k of ``gi`` against exact search over ``features`` (the raw features it was built
    from), with ``num_queries`` random gallery rows as queries (:func:`recall_against`)."""
    rows = _Rows(features)
    nq = min(num_queries, rows.n)
    ids = np.sort(np.random.default_rng(seed).choice(rows.n, size=nq, replace=False))
    q = rows.take(ids)
    _, exact = exact_search(rows.parts, gi.metric, q, min(max(ks) + 1, rows.n))
    return recall_against(gi, ids, q, exact, ks)


# ----------------------------------------------------------------------------- compatibility
def check_compatible(gi: GalleryIndex, cfg: Any, info: dict[str, Any] | None = None) -> None:
    """Refuse in one line a search whose query features would not be comparable with the index's:
    another metric (TEST.DIST_METRIC, TEST.FEAT_NORM), TEST.NECK_FEAT, checkpoint (sha256 of
    TEST.WEIGHT), input size, and, given the loaded model's ``info``, model or feature width."""
    where = f"the index {gi.path or '(in memory)'}"
    metric = metric_from_config(cfg)
    if metric.dist_metric != gi.metric.dist_metric:
        raise ConfigError(f"TEST.DIST_METRIC {metric.dist_metric}: {where} was built for {gi.metric.dist_metric} "
                          f"({gi.metric.name}); give TEST.DIST_METRIC {gi.metric.dist_metric} or build another index")
    if metric.feat_norm != gi.metric.feat_norm:
        want = "yes" if gi.metric.feat_norm else "no"
        raise ConfigError(f"TEST.FEAT_NORM {cfg.TEST.FEAT_NORM}: {where} was built with TEST.FEAT_NORM {want}; "
                          f"give TEST.FEAT_NORM {want} or build another index")
    model = gi.model
    neck = model.get("neck_feat")
    if neck and str(neck) != str(cfg.TEST.NECK_FEAT):
        raise ConfigError(f"TEST.NECK_FEAT {cfg.TEST.NECK_FEAT}: the features of {where} are taken {neck} the "
                          f"BNNeck; give TEST.NECK_FEAT {neck} or build another index")
    weight = str(cfg.TEST.WEIGHT or "")
    if model.get("sha256") and weight and os.path.isfile(weight):
        digest = file_sha256(weight)
        if digest != model["sha256"]:
            raise ConfigError(f"TEST.WEIGHT {weight} (sha256 {digest[:12]}...) is not the checkpoint of {where} "
                              f"({model.get('weight', '?')}, sha256 {str(model['sha256'])[:12]}...): the query "
                              "features would not be comparable; give that checkpoint or build another index")
    size = model.get("size_test")
    if size and [int(v) for v in size] != [int(v) for v in cfg.INPUT.SIZE_TEST]:
        raise ConfigError(f"INPUT.SIZE_TEST {list(cfg.INPUT.SIZE_TEST)}: the features of {where} were computed at "
                          f"{list(size)}; give INPUT.SIZE_TEST {list(size)} or build another index")
    if info is None:
        return
    name = model.get("model_name")
    if name and info.get("model_name") and str(name) != str(info["model_name"]):
        raise ConfigError(f"the model {info['model_name']} of {info.get('weight')} is not the {name} of {where}; "
                          "give the index's checkpoint or build another index")
    if int(info["feat_dim"]) != gi.d:
        raise ConfigError(f"{info.get('weight')} gives {info['feat_dim']}-d features, {where} holds {gi.d}-d ones; "
                          "give the index's checkpoint or build another index")


# ----------------------------------------------------------------------------- writing vectors
class _NpyWriter:
    """A ``.npy`` file written front to back (its header, then rows in order). A full disk is then
    an ``OSError`` at the write, where a write through a memory map would kill the process (SIGBUS)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype = path, tuple(int(v) for v in shape), np.dtype(dtype)
        self.rows = 0
        self.f = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})

    def write(self, rows: np.ndarray) -> None:
        """The next rows (converted to the file's dtype)."""
        self.f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def __enter__(self) -> _NpyWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()
        if exc[0] is None and self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield
