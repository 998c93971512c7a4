"""Top-k gallery matches of query images: results.json and one ranked-list picture per query.

    python tools/search.py --config_file configs/demo/vit_svllreid_demo.yml \\
        --query IMAGE_OR_DIR --gallery DIR_OR_NPZ --topk 10 --out DIR TEST.WEIGHT ckpt.pth [KEY VALUE ...]

The gallery is a folder (its features are extracted and cached in DIR/gallery_features.npz,
reused while the checkpoint, the test input settings and the files are unchanged) or a
file written by tools/extract_features.py. Distances are the evaluation's: TEST.FEAT_NORM,
TEST.DIST_METRIC, and k-reciprocal re-ranking with TEST.RE_RANKING True.

Writes DIR/results.json (per query: its path, then the top-k gallery paths with distances)
and DIR/ranked/<NNNN>_<query name>.png: the query, then the top-k thumbnails with rank and
distance; frames are green (same identity), red (another identity), grey dashed (same
identity, same camera) when names such as 0002_c1s1_000451_03.jpg give identities.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)
guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

from _common import camera_id, load_model, setup

from config import ConfigError
from utils import cli
from utils.inference_io import (FeatureSet, distance_matrix, distance_name, extract_folder, feature_signature,
                                list_image_files)
from utils.misc import write_json_atomic
from utils.visualize import Ranked, draw_ranked_list, match_status, ranked_indices

logger = logging.getLogger("svllreid")

CACHE_NAME = "gallery_features.npz"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config_file", default="", help="the YAML config the model was trained with")
    p.add_argument("--query", required=True, help="a query image or a folder of query images")
    p.add_argument("--gallery", required=True, help="a gallery folder or a .npz from tools/extract_features.py")
    p.add_argument("--topk", type=int, default=10, help="gallery entries per query (default 10)")
    p.add_argument("--out", required=True, help="output folder (results.json, ranked/*.png, feature cache)")
    p.add_argument("--camera", type=int, default=None,
                   help="camera number (c1 = 1) for images whose name has none; used by SIE models")
    p.add_argument("--no_pictures", action="store_true", help="write results.json only")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (TEST.WEIGHT required)")
    return p.parse_args(argv)


def _query_set(cfg: Any, model: Any, info: dict, path: str, device: Any, cam: int | None) -> FeatureSet:
    if os.path.isdir(path):
        return extract_folder(cfg, model, info, path, device, camera=cam)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such query image or folder: {path}")
    root, name = os.path.split(os.path.abspath(path))
    fs = extract_folder(cfg, model, info, root, device, camera=cam, files=[name])
    return fs


def _gallery_set(cfg: Any, model: Any, info: dict, path: str, out_dir: str, device: Any, cam: int | None
                 ) -> FeatureSet:
    if os.path.isfile(path):
        gs = FeatureSet.load(path)
        if gs.features.shape[1] != info["feat_dim"]:
            raise ConfigError(f"{path}: {gs.features.shape[1]}-d features, the model gives {info['feat_dim']}-d "
                              "(written with another model?)")
        if gs.meta.get("weight") and os.path.abspath(gs.meta["weight"]) != os.path.abspath(cfg.TEST.WEIGHT):
            logger.warning("%s was written with %s, not TEST.WEIGHT %s: distances mix two models",
                           path, gs.meta["weight"], cfg.TEST.WEIGHT)
        if not gs.root:
            gs.root = os.path.dirname(os.path.abspath(path))
        logger.info("Gallery: %d features from %s", len(gs.paths), path)
        return gs
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such gallery folder or feature file: {path}")
    files = list_image_files(path)
    sig = feature_signature(cfg, path, files, cam)
    cache = os.path.join(out_dir, CACHE_NAME)
    if os.path.isfile(cache):
        try:
            cached = FeatureSet.load(cache)
            if cached.meta.get("signature") == sig:
                logger.info("Gallery: %d cached features from %s", len(cached.paths), cache)
                return cached
        except (ConfigError, OSError, ValueError, KeyError):
            pass
    gs = extract_folder(cfg, model, info, path, device, camera=cam, files=files)
    gs.meta["signature"] = sig
    gs.save(cache)
    logger.info("Gallery: %d images encoded, features cached in %s", len(gs.paths), cache)
    return gs


def search(args: argparse.Namespace) -> dict[str, Any]:
    """Run the search; returns the results.json content."""
    if args.topk < 1:
        raise ConfigError(f"--topk {args.topk}: give a positive number of gallery entries")
    if not os.path.exists(args.query):
        raise FileNotFoundError(f"no such query image or folder: {args.query}")
    if not os.path.exists(args.gallery):
        raise FileNotFoundError(f"no such gallery folder or feature file: {args.gallery}")
    if os.path.isfile(args.gallery):
        FeatureSet.load(args.gallery)              # a bad file fails before the model is built
    cfg, device = setup(args.config_file, args.opts)
    cam = camera_id(args.camera)
    model, info = load_model(cfg)
    os.makedirs(args.out, exist_ok=True)
    gs = _gallery_set(cfg, model, info, args.gallery, args.out, device, cam)
    qs = _query_set(cfg, model, info, args.query, device, cam)
    k = min(args.topk, len(gs.paths))
    if k < args.topk:
        logger.warning("--topk %d: the gallery has only %d images", args.topk, k)
    dist = distance_matrix(cfg, qs.features, gs.features)
    order = ranked_indices(dist)[:, :k]
    d = dist.cpu().numpy()
    dname = distance_name(cfg)
    queries = []
    pic_dir = os.path.join(args.out, "ranked")
    for i, rel in enumerate(qs.paths):
        qpath = os.path.join(qs.root, rel)
        qpid, qcam = int(qs.pids[i]), int(qs.camids[i])
        hits = []
        for r, g in enumerate(order[i], start=1):
            gpid, gcam = int(gs.pids[g]), int(gs.camids[g])
            status = match_status(qpid, qcam, gpid, gcam)
            hits.append({"rank": r, "path": os.path.join(gs.root, gs.paths[g]), "distance": float(d[i, g]),
                         "pid": gpid, "camid": gcam,
                         "same_identity": None if "unknown" == status else status != "wrong"})
        entry: dict[str, Any] = {"query": qpath, "pid": qpid, "camid": qcam, "results": hits}
        if not args.no_pictures:
            stem = os.path.splitext(rel.replace(os.sep, "_"))[0]
            png = os.path.join(pic_dir, f"{i + 1:04d}_{stem}.png")
            ranked = [Ranked(h["path"], h["rank"], h["distance"],
                             match_status(qpid, qcam, h["pid"], h["camid"]),
                             f"id {h['pid']}  c{h['camid'] + 1}" if h["pid"] >= 0 else "")
                      for h in hits]
            draw_ranked_list(qpath, ranked, png, size_hw=cfg.INPUT.SIZE_TEST,
                             query_caption=f"id {qpid}  c{qcam + 1}" if qpid >= 0 else os.path.basename(rel),
                             title=f"{os.path.basename(rel)}: top {k} of {len(gs.paths)} gallery images "
                                   f"({dname})")
            entry["picture"] = png
        queries.append(entry)
    out = {"checkpoint": os.path.abspath(cfg.TEST.WEIGHT), "gallery": os.path.abspath(args.gallery),
           "distance": dname, "topk": k, "num_gallery": len(gs.paths), "queries": queries,
           "unreadable": [{"path": p, "error": e} for p, e in qs.failed + gs.failed]}
    path = os.path.join(args.out, "results.json")
    write_json_atomic(path, out)
    logger.info("%d queries x %d gallery images -> %s%s", len(queries), len(gs.paths), path,
                "" if args.no_pictures else f" and {len(queries)} pictures in {pic_dir}")
    failed = qs.failed + gs.failed
    if failed:
        logger.warning("%d unreadable file(s) skipped:\n%s", len(failed),
                       "\n".join(f"  {p}: {r}" for p, r in failed))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: search(args))


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
