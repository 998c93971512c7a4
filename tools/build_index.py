"""Build a gallery index (faiss) from feature files, once, for many searches with tools/search.py --index.

    python tools/build_index.py --config_file configs/demo/vit_svllreid_demo.yml \\
        --features FEATS.npz [MORE.npz | PARTS_DIR ...] --out INDEX_DIR [--kind flat|ivf-pq] \\
        [--nlist N] [--m M] [--nprobe P] [--refine R] [KEY VALUE ...]

--features takes files of tools/extract_features.py and folders of its parts
(part-00000-of-00002.npz ...), read in the order given, kept on disk (memory-mapped): they must
share the feature width and the model metadata. The distance comes from the config:
TEST.DIST_METRIC and TEST.FEAT_NORM (TEST.RE_RANKING is refused: an index cannot re-rank).

--kind: flat (exact; the float32 gallery in memory) or ivf-pq (approximate; compressed codes,
with the R x k best candidates re-ranked exactly from float16 vectors kept on disk). Without it:
flat when the float32 gallery takes at most a quarter of the machine's memory, else ivf-pq.
The ivf-pq parameters are chosen from the gallery size and logged; --nlist, --m, --nprobe and
--refine override them. For ivf-pq, recall@1 and recall@10 against the exact search are
measured on random gallery images used as queries (their own entry left out) and logged.

Junk gallery images (-1_* names) are left out at build, as the evaluation leaves them out.
INDEX_DIR is written complete or not at all: built in a hidden sibling folder and renamed into
place; an older index there is replaced only then.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

import numpy as np

from config import ConfigError, load_config
from datasets.market1501 import is_junk_name
from retrieval import index as gx
from retrieval.feature_parts import model_meta, read_feature_sets
from retrieval.features import FeatureSet
from retrieval.index_store import check_index_target, write_index
from utils import cli
from utils.checkpoint import file_sha256, read_metadata
from utils.errors import UserError, import_extra
from utils.logger import setup_logger

logger = logging.getLogger("svllreid")

RECALL_FLOPS = 2e11        # the exact reference of the recall costs about queries x n x d (bounded by this)
RECALL_MAX_QUERIES = 1000
RECALL_MIN_QUERIES = 20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config_file", default="", help="the YAML config (TEST.DIST_METRIC, TEST.FEAT_NORM)")
    p.add_argument("--features", nargs="+", action="extend", required=True, metavar="PARTS",
                   help="feature files (.npz) and folders of parts, in order")
    p.add_argument("--out", required=True, help="the index folder to write (replaced when complete)")
    p.add_argument("--kind", choices=gx.KINDS, default=None,
                   help="flat (exact) or ivf-pq (approximate); default: flat when the gallery fits comfortably "
                        "in memory")
    p.add_argument("--nlist", type=int, default=None, help="ivf-pq: inverted lists (default ~ sqrt(n))")
    p.add_argument("--m", type=int, default=None, help="ivf-pq: PQ sub-quantisers, a divisor of the feature width")
    p.add_argument("--nprobe", type=int, default=None, help="ivf-pq: lists scanned per query (default ~ nlist / 8)")
    p.add_argument("--refine", type=int, default=None,
                   help="ivf-pq: re-rank R x k candidates exactly from float16 vectors on disk (default 10; 0: none)")
    p.add_argument("--recall_queries", type=int, default=None,
                   help="ivf-pq: gallery images used as queries to measure recall (default from the size; 0: skip)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return cli.parse_with_overrides(p, argv)


# ----------------------------------------------------------------------------- the features
def read_sets(paths: Sequence[str]) -> tuple[list[FeatureSet], list[str]]:
    """The feature sets of ``paths`` (files, folders of parts), their features memory-mapped, checked
    as ``retrieval.feature_parts.load_features`` checks them; a set without a root gets its file's folder."""
    sets, names = read_feature_sets(paths, mmap=True)
    for fs, name in zip(sets, names):
        if not fs.root:
            fs.root = os.path.dirname(os.path.abspath(name))
    return sets, names


def _runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in ``keep``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]


def gallery_of(sets: Sequence[FeatureSet], paths: Sequence[str]) -> tuple[list[np.ndarray], gx.Items, int]:
    """(feature parts without junk, as slices of the memory maps; the items; junk count)."""
    roots = {fs.root for fs in sets}
    root = next(iter(roots)) if len(roots) == 1 else os.path.commonpath([os.path.abspath(r) for r in roots])
    parts: list[np.ndarray] = []
    rel: list[str] = []
    pids, camids = [], []
    junk = 0
    for fs in sets:
        keep = np.array([not is_junk_name(p) for p in fs.paths], dtype=bool)
        junk += int((~keep).sum())
        parts += [fs.features[a:b] for a, b in _runs(keep)]
        moved = fs.paths if fs.root == root else [os.path.relpath(os.path.join(fs.root, p), root) for p in fs.paths]
        rel += [p for p, k in zip(moved, keep) if k]
        pids.append(fs.pids[keep])
        camids.append(fs.camids[keep])
    if not rel:
        what = f"all {junk} images are junk (-1_* names), which are left out as in the evaluation" if junk else \
            "no features (0 images)"
        raise UserError(f"{', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}: {what}; nothing to index")
    seen: set[str] = set()
    for p in rel:
        if p in seen:
            raise UserError(f"{os.path.join(root, p)} is in two of the feature files given ({', '.join(paths[:4])}"
                            f"{' ...' if len(paths) > 4 else ''}): each image must be indexed once (a merged file "
                            "and its folder of parts hold the same images); give each once")
        seen.add(p)
    return parts, gx.Items(np.array(rel, dtype=str), np.concatenate(pids), np.concatenate(camids), root), junk


def model_of(meta: dict[str, Any], cfg: Any, name: str) -> dict[str, Any]:
    """The model metadata stored in index.json: the features' meta, with the checkpoint's sha256
    (computed from 'weight' for files written before it was recorded)."""
    model = model_meta(meta)
    model.pop("signature", None)
    if not model.get("sha256"):
        weight = model.get("weight")
        if not weight or not os.path.isfile(weight):
            raise UserError(f"{name} records no checkpoint sha256 and its checkpoint {weight or '(not recorded)'} "
                            "is gone: extract the features again with tools/extract_features.py")
        logger.info("%s records no checkpoint sha256: computed from %s", name, weight)
        model["sha256"] = file_sha256(weight)
    if not model.get("model_name"):
        saved = ((read_metadata(model["weight"]) or {}).get("config") or {}).get("MODEL") or {} \
            if model.get("weight") and os.path.isfile(model["weight"]) else {}
        model["model_name"] = str(saved.get("NAME") or cfg.MODEL.NAME)
    if not model.get("neck_feat"):
        logger.info("%s does not record TEST.NECK_FEAT: taken as the config's, %s", name, cfg.TEST.NECK_FEAT)
        model["neck_feat"] = str(cfg.TEST.NECK_FEAT)
    return model


# ----------------------------------------------------------------------------- the build
def _recall_queries(n: int, d: int, given: int | None) -> int:
    if given is not None:
        if given < 0:
            raise ConfigError(f"--recall_queries {given}: expected 0 (no measurement) or a positive number")
        return min(given, n)
    return int(min(n, RECALL_MAX_QUERIES, max(RECALL_MIN_QUERIES, RECALL_FLOPS // max(1, n * d))))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build and write the index; returns its index.json."""
    import_extra("faiss", "index")                   # the index extra, before any reading
    setup_logger("svllreid", None, if_train=False)
    cfg = load_config(args.config_file, list(args.opts))
    metric = gx.metric_from_config(cfg)             # TEST.RE_RANKING refused before any reading
    check_index_target(args.out)
    sets, names = read_sets(args.features)
    parts, items, junk = gallery_of(sets, args.features)
    n, d = len(items), int(sets[0].features.shape[1])
    model = model_of(sets[0].meta, cfg, names[0])
    if str(model.get("feat_dim", d)) != str(d):
        raise UserError(f"{names[0]}: its meta says {model['feat_dim']}-d features, the file holds {d}-d; extract "
                        "it again with tools/extract_features.py")
    logger.info("Gallery: %d images (%d-d features) from %d file(s)%s, under %s", n, d, len(names),
                f", {junk} junk image(s) (-1_* names) left out as the evaluation does" if junk else "", items.root)
    failed = sum(len(fs.failed) for fs in sets)
    if failed:
        logger.warning("%d image(s) were unreadable at extraction and are not in the index (listed in the "
                       "feature files' 'failed')", failed)
    if args.kind is None:
        kind, reason = gx.default_kind(n, d)
        logger.info("Kind: %s (%s; --kind overrides)", kind, reason)
    else:
        kind = args.kind
        logger.info("Kind: %s (--kind)", kind)
    given = {k: getattr(args, k) for k in ("nlist", "m", "nprobe", "refine") if getattr(args, k) is not None}
    params = gx.choose_params(n, d, kind, **given)
    nq = _recall_queries(n, d, args.recall_queries) if kind != "flat" else 0
    logger.info("Parameters (chosen from n = %d, d = %d%s): %s", n, d,
                f"; given: {', '.join(f'--{k} {v}' for k, v in given.items())}" if given else "",
                json.dumps(params))
    logger.info("Distance: %s (TEST.FEAT_NORM %s, TEST.DIST_METRIC %s)", metric.name, cfg.TEST.FEAT_NORM,
                metric.dist_metric)

    exact = None
    if nq:
        ids = np.sort(np.random.default_rng(int(params.get("seed", 0)) + 1).choice(n, size=nq, replace=False))
        queries = gx.gather_rows(parts, ids)
        exact = gx.ExactTopK(gx.prepare(queries, metric), metric, min(11, n))   # computed while adding

    def measure(gi: gx.GalleryIndex) -> dict[str, Any]:
        if exact is None:
            return {}
        rec = gx.recall_against(gi, ids, queries, exact.result()[1], ks=(1, 10))
        if rec["queries"]:
            logger.info("Recall of %s (nprobe %d, refine %d) against exact flat search, on %d random gallery "
                        "images used as queries (each query's own entry left out): recall@1 %.4f, recall@10 %.4f",
                        kind, params["nprobe"], params["refine"], rec["queries"], rec["recall@1"],
                        rec.get("recall@10", float("nan")))
        return {"recall": {**rec, "measured_on": "random gallery images as queries, their own entry left out",
                           "nprobe": params["nprobe"], "refine": params["refine"]}}

    gi = write_index(args.out, parts, metric, params, items, model, junk, measure=measure,
                        on_chunk=exact.add if exact is not None else None)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    logger.info("Index of %d images (%s, %s) -> %s (%.1f MB on disk)", gi.n, kind, metric.name, args.out,
                size / 2 ** 20)
    return gi.info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: run(args))


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
