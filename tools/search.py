"""Top-k gallery matches of query images: results.json and one ranked-list picture per query.

    python tools/search.py --config_file configs/demo/vit_svllreid_demo.yml \\
        --query IMAGE_OR_DIR --gallery DIR_OR_NPZ --topk 10 --out DIR TEST.WEIGHT ckpt.pth [KEY VALUE ...]
    python tools/search.py --config_file configs/demo/vit_svllreid_demo.yml \\
        --query IMAGE_OR_DIR --index INDEX_DIR --topk 10 --out DIR TEST.WEIGHT ckpt.pth [KEY VALUE ...]

The gallery is a folder (its features are extracted and cached in DIR/gallery_features.npz,
reused while the checkpoint, the test input settings and the files are unchanged) or a
file written by tools/extract_features.py. A folder's sub-folders that hold this project's
output (DIR itself, other searches' folders, training runs: a .lock file) are left out.
Distances are the evaluation's: TEST.FEAT_NORM, TEST.DIST_METRIC, and k-reciprocal re-ranking
with TEST.RE_RANKING True.

--index INDEX_DIR searches an index of tools/build_index.py instead (no re-ranking): the same
results.json and pictures. It is refused in one line when the config's checkpoint (sha256),
model, feature width, TEST.FEAT_NORM, TEST.NECK_FEAT, TEST.DIST_METRIC or input size differ
from the index's, and when --topk exceeds the images it holds.

Writes DIR/results.json (per query: its path, then the top-k gallery paths with distances)
and DIR/ranked/<NNNN>_<query name>.png: the query, then the top-k thumbnails with rank and
distance; frames are green (same identity), red (another identity), grey dashed (same
identity, same camera) when names such as 0002_c1s1_000451_03.jpg give identities.

Junk gallery images (``-1_*`` names) are left out, as the evaluation leaves them out (an
index leaves them out when it is built). Features holding NaN/Inf and damaged or empty
feature files are refused. DIR is locked while a search runs (a second one on it fails at
once); a new search replaces the previous results.json and ranked/ (pictures are drawn aside
and moved in at the end), so they always come from one run.
Options may also follow the KEY VALUE overrides.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

import numpy as np

from config import ConfigError
from datasets.market1501 import is_junk_name
from retrieval import index as gx
from retrieval.features import FeatureSet, camera_number, extract_folder, feature_signature, list_image_files
from retrieval.index_store import load_index
from tools._common import camera_id, load_model, setup
from utils import cli
from utils.distance import DistanceSpec, check_finite_features, ranked_indices
from utils.misc import write_json_atomic
from utils.run_dir import RunLock
from utils.visualize import Ranked, draw_ranked_list, match_status

logger = logging.getLogger("svllreid")

CACHE_NAME = "gallery_features.npz"
PICTURES = "ranked"
STAGING = ".svllreid-partial-ranked-"   # pictures of a run in progress, moved to ranked/ at the end


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config_file", default="", help="the YAML config the model was trained with")
    p.add_argument("--query", required=True, help="a query image or a folder of query images")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gallery", help="a gallery folder or a .npz from tools/extract_features.py")
    where.add_argument("--index", help="an index folder written by tools/build_index.py")
    p.add_argument("--topk", type=int, default=10, help="gallery entries per query (default 10)")
    p.add_argument("--out", required=True, help="output folder (results.json, ranked/*.png, feature cache)")
    p.add_argument("--camera", type=int, default=None,
                   help="camera number (c1 = 1) for images whose name has none; used by SIE models")
    p.add_argument("--no_pictures", action="store_true", help="write results.json only")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (TEST.WEIGHT required)")
    return cli.parse_with_overrides(p, argv)


def _query_set(cfg: Any, model: Any, info: dict, path: str, device: Any, cam: int | None, out_dir: str) -> FeatureSet:
    if os.path.isdir(path):
        return extract_folder(cfg, model, info, path, device, camera=cam, files=list_image_files(path, [out_dir]))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such query image or folder: {path}")
    root, name = os.path.split(os.path.abspath(path))
    fs = extract_folder(cfg, model, info, root, device, camera=cam, files=[name])
    return fs


def _feature_file(path: str) -> FeatureSet:
    """A gallery .npz, refused (one line naming it) when damaged or holding NaN/Inf features."""
    gs = FeatureSet.load(path)
    check_finite_features(gs.features, path, cause="the model that wrote it was not finite (a diverged run or a "
                          "damaged checkpoint)", outcome="nothing searched")
    if not gs.root:
        gs.root = os.path.dirname(os.path.abspath(path))
    return gs


def _gallery_set(cfg: Any, model: Any, info: dict, path: str, out_dir: str, device: Any, cam: int | None,
                 loaded: FeatureSet | None = None) -> FeatureSet:
    """The gallery's features: ``loaded`` (the .npz given as --gallery), else a folder's, cached in ``out_dir``."""
    if loaded is not None:
        gs = loaded
        if gs.features.shape[1] != info["feat_dim"]:
            raise ConfigError(f"{path}: {gs.features.shape[1]}-d features, the model gives {info['feat_dim']}-d "
                              "(written with another model?)")
        if gs.meta.get("weight") and os.path.abspath(gs.meta["weight"]) != os.path.abspath(cfg.TEST.WEIGHT):
            logger.warning("%s was written with %s, not TEST.WEIGHT %s: distances mix two models",
                           path, gs.meta["weight"], cfg.TEST.WEIGHT)
        logger.info("Gallery: %d features from %s", len(gs.paths), path)
        return gs
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such gallery folder or feature file: {path}")
    files = list_image_files(path, [out_dir])        # never this search's own pictures
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


def _without_junk(gs: FeatureSet, gallery: str) -> tuple[FeatureSet, int]:
    """The gallery without its junk images (``-1_*``), left out as the evaluation leaves them out."""
    keep = np.array([not is_junk_name(p) for p in gs.paths], dtype=bool)
    n_junk = int((~keep).sum())
    if not n_junk:
        return gs, 0
    if not keep.any():
        raise ConfigError(f"gallery {gallery}: all {n_junk} images are junk (-1_* names), which are left out as "
                          "in the evaluation; nothing to search")
    logger.info("Gallery: %d junk image(s) (-1_* names) left out, as the evaluation does", n_junk)
    return FeatureSet(gs.features[keep], [p for p, k in zip(gs.paths, keep) if k], gs.pids[keep], gs.camids[keep],
                      gs.root, gs.failed, gs.meta), n_junk


def _check_gallery_root(gs: FeatureSet | gx.Items, gallery: str, pictures: bool) -> None:
    """A feature file whose images are gone: refused when pictures are asked for, else a warning."""
    if os.path.isdir(gs.root):
        return
    if pictures:
        raise FileNotFoundError(f"gallery {gallery}: its images were under {gs.root}, which no longer exists, so "
                                "the ranked-list pictures cannot be drawn; restore the folder (or re-extract the "
                                "features), or add --no_pictures for results.json alone")
    logger.warning("gallery %s: its images were under %s, which no longer exists: the paths in results.json "
                   "point to missing files", gallery, gs.root)


def _replace_outputs(out_dir: str, staged_pictures: str | None, results: dict[str, Any]) -> None:
    """Put this run's results.json and ranked/ in place of the previous run's (called with the lock held).

    The previous results.json goes first, then ranked/ is swapped for the staged folder (or removed
    with --no_pictures), then the new results.json is written atomically: a results.json never
    sits beside pictures of another run.
    """
    final = os.path.join(out_dir, PICTURES)
    res = os.path.join(out_dir, "results.json")
    if os.path.exists(res):
        os.remove(res)
    if os.path.isdir(final):
        old = os.path.join(out_dir, f"{STAGING}old-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old)
    if staged_pictures is not None:
        os.replace(staged_pictures, final)
    write_json_atomic(res, results)


def search(args: argparse.Namespace) -> dict[str, Any]:
    """Run the search; returns the results.json content."""
    if args.topk < 1:
        raise ConfigError(f"--topk {args.topk}: give a positive number of gallery entries")
    if not os.path.exists(args.query):
        raise FileNotFoundError(f"no such query image or folder: {args.query}")
    index = loaded = None
    if args.index is not None:            # a damaged index, a --topk beyond it: refused before the model is built
        index = load_index(args.index)
        if args.topk > index.n:
            raise ConfigError(f"--topk {args.topk} is more than the {index.n} images of the index {args.index}; "
                              f"give --topk {index.n} or less")
        if not args.no_pictures:
            _check_gallery_root(index.items, args.index, pictures=True)
    else:
        if not os.path.exists(args.gallery):
            raise FileNotFoundError(f"no such gallery folder or feature file: {args.gallery}")
        loaded = _feature_file(args.gallery) if os.path.isfile(args.gallery) else None   # bad files fail before
        if loaded is not None and not args.no_pictures:                                     # the model is built
            _check_gallery_root(loaded, args.gallery, pictures=True)
    cfg, device = setup(args.config_file, args.opts)
    camera_id(args.camera)
    if index is not None:
        gx.check_compatible(index, cfg)          # metric, neck, checkpoint, input size: before the model
    model, info = load_model(cfg)
    if index is not None:
        gx.check_compatible(index, cfg, info)    # model and feature width
    cam = camera_id(args.camera, info)
    with RunLock(args.out, "--out"):    # one search per folder: its results.json and pictures stay one run's
        _remove_staging(args.out)        # of a killed run
        try:
            return _search(args, cfg, device, cam, model, info, loaded, index)
        finally:
            _remove_staging(args.out)    # pictures of a search that failed or was interrupted


def _remove_staging(out_dir: str) -> None:
    for leftover in glob.glob(os.path.join(glob.escape(out_dir), STAGING + "*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _search(args: argparse.Namespace, cfg: Any, device: Any, cam: int | None, model: Any, info: dict,
            loaded: FeatureSet | None, index: gx.GalleryIndex | None = None) -> dict[str, Any]:
    gs: FeatureSet | gx.Items
    if index is not None:
        gallery, gs, n_junk, gallery_failed = args.index, index.items, index.junk_left_out, []
        logger.info("Gallery: the %s index %s of %d images", index.kind, args.index, index.n)
        _check_gallery_root(gs, gallery, not args.no_pictures)
        qs = _query_set(cfg, model, info, args.query, device, cam, args.out)
        check_finite_features(qs.features, f"query {args.query}", outcome="nothing searched")
        k = args.topk
        d, order = gx.search(index, qs.features, k)           # (nq, k), ranked
        dname = index.metric.name
    else:
        gallery = args.gallery
        fs = _gallery_set(cfg, model, info, gallery, args.out, device, cam, loaded)
        check_finite_features(fs.features, f"gallery {gallery}", outcome="nothing searched")
        fs, n_junk = _without_junk(fs, gallery)
        gs, gallery_failed = fs, fs.failed
        _check_gallery_root(gs, gallery, not args.no_pictures)
        qs = _query_set(cfg, model, info, args.query, device, cam, args.out)
        check_finite_features(qs.features, f"query {args.query}", outcome="nothing searched")
        k = min(args.topk, len(gs.paths))
        if k < args.topk:
            logger.warning("--topk %d: the gallery has only %d images", args.topk, k)
        spec = DistanceSpec.from_cfg(cfg)
        dist = spec.matrix(qs.features, fs.features)
        order = ranked_indices(dist)[:, :k]
        d = np.take_along_axis(dist.cpu().numpy(), order, 1)
        dname = spec.name
    num_gallery = len(gs.paths)
    queries = []

    def cam_name(camid: int) -> str:   # the camera as its names write it
        n = camera_number(camid, info["camera_numbers"])
        return f"c{n}" if n is not None else "c?"
    pic_dir = os.path.join(args.out, PICTURES)
    staged = None if args.no_pictures else os.path.join(args.out, f"{STAGING}{os.getpid()}")
    for i, rel in enumerate(qs.paths):
        qpath = os.path.join(qs.root, rel)
        qpid, qcam = int(qs.pids[i]), int(qs.camids[i])
        hits = []
        for r, g in enumerate(order[i], start=1):
            gpid, gcam = int(gs.pids[g]), int(gs.camids[g])
            status = match_status(qpid, qcam, gpid, gcam)
            hits.append({"rank": r, "path": os.path.join(gs.root, str(gs.paths[g])), "distance": float(d[i, r - 1]),
                         "pid": gpid, "camid": gcam,
                         "same_identity": None if "unknown" == status else status != "wrong"})
        entry: dict[str, Any] = {"query": qpath, "pid": qpid, "camid": qcam, "results": hits}
        if staged is not None:
            stem = os.path.splitext(rel.replace(os.sep, "_"))[0]
            name = f"{i + 1:04d}_{stem}.png"
            ranked = [Ranked(h["path"], h["rank"], h["distance"],
                             match_status(qpid, qcam, h["pid"], h["camid"]),
                             f"id {h['pid']}  {cam_name(h['camid'])}" if h["pid"] >= 0 else "")
                      for h in hits]
            draw_ranked_list(qpath, ranked, os.path.join(staged, name), size_hw=cfg.INPUT.SIZE_TEST,
                             query_caption=f"id {qpid}  {cam_name(qcam)}" if qpid >= 0 else os.path.basename(rel),
                             title=f"{os.path.basename(rel)}: top {k} of {num_gallery} gallery images "
                                   f"({dname})")
            entry["picture"] = os.path.join(pic_dir, name)
        queries.append(entry)
    out = {"checkpoint": os.path.abspath(cfg.TEST.WEIGHT), "gallery": os.path.abspath(gallery),
           "distance": dname, "topk": k, "num_gallery": num_gallery, "junk_left_out": n_junk,
           "queries": queries, "unreadable": [{"path": p, "error": e} for p, e in qs.failed + gallery_failed]}
    if index is not None:
        out["index"] = {"kind": index.kind, "params": index.params}
    if staged is not None:
        os.makedirs(staged, exist_ok=True)      # even for no query picture, so ranked/ is this run's
    _replace_outputs(args.out, staged, out)
    path = os.path.join(args.out, "results.json")
    logger.info("%d queries x %d gallery images -> %s%s", len(queries), num_gallery, path,
                "" if args.no_pictures else f" and {len(queries)} pictures in {pic_dir}")
    failed = qs.failed + gallery_failed
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
