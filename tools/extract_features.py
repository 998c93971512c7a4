"""Features of every image under a folder, as the evaluation computes them, into one .npz (or parts).

    python tools/extract_features.py --config_file configs/demo/vit_svllreid_demo.yml \\
        --images DIR --out feats.npz TEST.WEIGHT output/demo/ViT-B-16_40.pth [KEY VALUE ...]

The checkpoint is TEST.WEIGHT; images are read recursively (any mode or size Pillow opens)
and go through the test transform. The file holds ``features`` (N x D float32, not
normalised: the evaluation normalises when TEST.FEAT_NORM is yes), ``paths`` (relative to
DIR), ``pids`` / ``camids`` from names such as ``0002_c1s1_000451_03.jpg`` (else -1),
``failed`` (unreadable files, also listed at the end), ``root`` and ``meta`` (JSON).
A model trained with camera side information (MODEL.SIE_CAMERA) uses the camera of the name,
else ``--camera N``, else none (with a warning: such features are less comparable).

Several processes (``python tools/launch.py --nproc_per_node N`` or ``torchrun``, several
machines as for training; one GPU per process from MODEL.DEVICE_ID) share the work: ``--out`` is
then a folder, and rank r of W writes ``part-RRRRR-of-WWWWW.npz`` for its contiguous share of
the sorted image list. Run again, the finished parts are checked (same image list, same model)
and kept; a part whose images changed since (size or modification time) and missing parts are
extracted. ``--merge feats.npz`` writes the parts as the one file a single process writes
(after the last part, on rank 0; alone, without ``--images``, it merges the parts of ``--out``).
Under tools/launch.py, what can be refused before the processes start is (:func:`check_launch`),
and a refusal of every process is one line (rank 0's), with no report of torchrun's.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

import torch

from retrieval.feature_parts import (
    SHARD_KEY,
    list_digest,
    merge_parts,
    part_name,
    part_problem,
    scan_parts,
    shard_bounds,
    shard_meta,
)
from retrieval.features import extract_folder, feature_meta, input_meta, list_image_files
from tools._common import camera_id, load_model, load_tool_config, setup
from utils import cli
from utils.dist import all_gather_object, cleanup, get_rank, get_world_size
from utils.errors import ReportedElsewhere, UserError
from utils.fileio import remove_stale_temporaries
from utils.logger import setup_logger
from utils.misc import world_processes

logger = logging.getLogger("svllreid")

# Collectives wait for the slowest process (a resumed rank waits for the whole extraction of
# the others); a process that fails still ends the job, since torchrun stops the others.
DIST_TIMEOUT_MINUTES = 7 * 24 * 60.0
PROGRESS_SECONDS = 60.0       # a progress line per process at most this often


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config_file", default="", help="the YAML config the model was trained with")
    p.add_argument("--images", default=None, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True,
                   help="output .npz file; a folder of parts with several processes (or an existing folder)")
    p.add_argument("--merge", default=None, metavar="FILE",
                   help="also write the parts of --out as one .npz FILE; without --images only merge them")
    p.add_argument("--camera", type=int, default=None,
                   help="camera number (c1 = 1) for images whose name has none; used by SIE models")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (TEST.WEIGHT required)")
    return cli.parse_with_overrides(p, argv)


def writes_parts(out: str, world: int) -> bool:
    """Whether ``--out`` is a folder of parts: several processes, or a folder given by the user."""
    return world > 1 or os.path.isdir(out) or out.endswith(("/", os.sep))


def _check_args(args: argparse.Namespace, world: int) -> list[str] | None:
    """The refusals of the command line alone, for ``world`` processes; the image list (None for
    a merge alone). Shared by :func:`run` and the launcher's :func:`check_launch`."""
    if args.merge and os.path.isdir(args.merge):
        raise UserError(f"--merge {args.merge} is a folder: give the .npz file to write")
    if args.images is None:
        if not args.merge:
            raise UserError("--images is required (or --merge FILE without --images, to join the parts in --out)")
        if world > 1:
            raise UserError("--merge without --images joins finished parts: run it as one process, not under torchrun")
        return None
    parts = writes_parts(args.out, world)
    if parts and (args.out.endswith(".npz") or os.path.isfile(args.out)):
        raise UserError(f"--out {args.out}: {world} processes write one part each into a folder; give a folder "
                        f"(e.g. --out {args.out.removesuffix('.npz')}_parts/) and --merge FILE.npz for one file")
    if args.merge and not parts:
        raise UserError(f"--merge joins the parts of a folder, and --out {args.out} is one file already")
    camera_id(args.camera)                         # a bad number fails before the model is built
    return list_image_files(args.images)           # so does a bad folder


def check_launch(argv: Sequence[str], world: int | None) -> None:
    """What ``tools/launch.py`` checks once, before it starts ``world`` processes (None: not known
    before they meet): the command line, the image folder, and the finished parts of ``--out``
    against what is known without the model (another number of processes, another image list,
    another checkpoint, TEST.NECK_FEAT, TEST.FEAT_NORM or input size). The processes check the
    rest. Raises the refusal as a :class:`UserError`."""
    args = parse_args(argv)
    files = _check_args(args, world or 2)
    if files is None or world is None or not os.path.isdir(args.out):
        return
    cfg = load_tool_config(args.config_file, args.opts)
    if not cfg.TEST.WEIGHT or not os.path.isfile(cfg.TEST.WEIGHT):
        return                                     # the processes say it, as one process would
    meta = input_meta(cfg)
    digest = list_digest(files)
    for rank in range(world):
        meta[SHARD_KEY] = shard_meta(files, rank, world, digest, root=args.images)
        start, stop = shard_bounds(len(files), rank, world)
        problem, _ = _part_refusal(args.out, os.path.join(args.out, part_name(rank, world)), world, meta,
                                   files[start:stop], partial=True)
        if problem:
            raise UserError(problem)


def run(args: argparse.Namespace) -> None:
    world = world_processes()
    setup_logger("svllreid", None, if_train=False)    # what the listing leaves out is logged
    files = _check_args(args, world)
    if files is None:
        _merge(args.out, args.merge)
        return
    if writes_parts(args.out, world):
        run_sharded(args, files)
        return
    cfg, device = setup(args.config_file, args.opts)
    model, info = load_model(cfg)
    cam = camera_id(args.camera, info)
    fs = extract_folder(cfg, model, info, args.images, device, camera=cam, files=files)
    fs.save(args.out)
    n_lab = int((fs.pids >= 0).sum())
    logger.info("%d images -> %s: features %s, identity and camera parsed from %d names", len(fs.paths), args.out,
                "x".join(map(str, fs.features.shape)), n_lab)
    _warn_failed(fs.failed)


def _warn_failed(failed: Sequence[tuple[str, str]], who: str = "") -> None:
    if failed:
        logger.warning("%s%d unreadable file(s) skipped (also in the file's 'failed'):\n%s", who, len(failed),
                       "\n".join(f"  {p}: {r}" for p, r in failed))


def _merge(folder: str, out: str) -> None:
    if not os.path.isdir(folder):
        raise UserError(f"--out {folder}: no such folder of parts (part-RRRRR-of-WWWWW.npz, written by an extraction "
                        "with several processes); give the folder the extraction wrote")
    fs = merge_parts(folder, out)
    logger.info("%d images from the parts in %s -> %s: features %s", len(fs.paths), folder, out,
                "x".join(map(str, fs.features.shape)))


def _every_rank(record: logging.LogRecord) -> bool:
    """On ranks other than 0: warnings, and the lines meant for every process."""
    return record.levelno >= logging.WARNING or bool(getattr(record, "every_rank", False))


class _Progress:
    """``report`` callback of :func:`extract_folder`: a line with the rate every PROGRESS_SECONDS."""

    def __init__(self, who: str) -> None:
        self.who, self.t0 = who, time.monotonic()
        self.last = self.t0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and done < total:
            self.last = now
            logger.info("%s%d/%d images, %.1f images/s", self.who, done, total, done / max(now - self.t0, 1e-9),
                        extra={"every_rank": True})


def _part_refusal(out: str, path: str, world: int, meta: dict, shard: Sequence[str],
                  partial: bool = False) -> tuple[str | None, bool]:
    """(why the finished parts in ``out`` forbid writing the part ``path``, or None; whether that
    part is still to be extracted: absent, or its images changed since). ``partial``: ``meta``
    holds only what is known before the model is loaded (:func:`check_launch`)."""
    others = {w: len(r) for w, r in scan_parts(out).items() if w != world}
    if others:
        w, n = sorted(others.items())[0]
        return (f"{out} holds {n} part(s) of an extraction by {w} processes, and this one runs {world}: "
                f"run it with {w} processes to finish those, or give another --out folder"), False
    if not os.path.isfile(path):
        return None, True
    problem, outdated = part_problem(path, meta, shard, partial=partial)
    if problem is not None:
        return (f"{path} is not this extraction's part: {problem}; remove it (or the folder) to extract "
                "it again, or give another --out folder"), False
    return None, outdated


def _check_start(out: str, path: str, world: int, meta: dict, shard: Sequence[str]) -> tuple[str | None, bool]:
    """(why this rank cannot start, whether its part is still to be extracted)."""
    try:
        os.makedirs(out, exist_ok=True)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            remove_stale_temporaries(out)          # what a killed write left: never a part
        problem, todo = _part_refusal(out, path, world, meta, shard)
        if todo and os.path.isfile(path):
            logger.info("%s: its images changed since it was extracted (another size or modification time under "
                        "the same names): extracting it again", path, extra={"every_rank": True})
        return problem, todo
    except (UserError, OSError) as e:
        return f"{cli.one_line(e)}", False


def _refuse(rank: int, message: str) -> None:
    """Every process refuses with ``message``, which they all know: rank 0 prints it, the others
    exit with the same code without repeating it."""
    raise (UserError if rank == 0 else ReportedElsewhere)(message)


def run_sharded(args: argparse.Namespace, files: list[str]) -> None:
    """This process's part of the sorted image list into ``--out``; the parts merged with ``--merge``."""
    cfg, device = setup(args.config_file, args.opts, dist_timeout_minutes=DIST_TIMEOUT_MINUTES)
    rank, world = get_rank(), get_world_size()
    if rank > 0:
        logger.addFilter(_every_rank)
    try:
        _run_rank(args, files, cfg, device, rank, world)
    finally:
        logger.removeFilter(_every_rank)
        cleanup()


def _run_rank(args: argparse.Namespace, files: list[str], cfg: Any, device: torch.device, rank: int,
              world: int) -> None:
    digest = list_digest(files)
    try:
        model, info = load_model(cfg)
        cam = camera_id(args.camera, info)
        failed = ""
    except cli.USER_ERRORS as e:             # said once, by rank 0, when every process fails alike
        failed = cli.one_line(e)
    seen = all_gather_object((len(files), digest, failed))
    if any(f for _, _, f in seen):
        said = [(r, f) for r, (_, _, f) in enumerate(seen) if f]
        r, first = said[0]
        _refuse(rank, first if len(said) == world and len({f for _, f in said}) == 1 else f"rank {r}: {first}")
    if len({(n, d) for n, d, _ in seen}) > 1:
        counts = ", ".join(f"rank {r}: {n}" for r, (n, _, _) in enumerate(seen))
        _refuse(rank, f"the processes see different image lists under {args.images} ({counts} files): every "
                "machine needs the same folder")
    meta = feature_meta(cfg, info, cam)
    meta[SHARD_KEY] = shard_meta(files, rank, world, digest, root=args.images)
    start, stop = shard_bounds(len(files), rank, world)
    shard = files[start:stop]
    path = os.path.join(args.out, part_name(rank, world))
    who = f"rank {rank}/{world}: " if world > 1 else ""
    error, todo = _check_start(args.out, path, world, meta, shard)
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        _refuse(rank, errors[0])
    t0 = time.monotonic()
    n_done = 0
    if todo:
        logger.info("%sextracting files %d..%d of %d (%d images) into %s", who, start, stop, len(files), len(shard),
                    path, extra={"every_rank": True})
        fs = extract_folder(cfg, model, info, args.images, device, camera=cam, files=shard, allow_empty=True,
                            report=_Progress(who))
        fs.meta[SHARD_KEY] = meta[SHARD_KEY]
        fs.save(path)
        n_done = len(shard)
        dt = time.monotonic() - t0
        logger.info("%s%d images in %.1f s (%.1f images/s) -> %s", who, n_done, dt, n_done / max(dt, 1e-9), path,
                    extra={"every_rank": True})
        _warn_failed(fs.failed, who)
    else:
        logger.info("%skept the finished part %s (files %d..%d)", who, path, start, stop, extra={"every_rank": True})
    dt = time.monotonic() - t0
    stats = all_gather_object((todo, n_done, dt))        # also waits for every part
    if rank != 0:
        return
    total = sum(n for _, n, _ in stats)
    wall = max(t for _, _, t in stats)
    redone = sum(1 for did, _, _ in stats if did)
    if redone:
        logger.info("%d part(s) in %s: %d extracted now (%d images in %.1f s by %d process(es), %.1f images/s in "
                    "all), %d kept from before", world, args.out, redone, total, wall, redone,
                    total / max(wall, 1e-9), world - redone)
    else:
        logger.info("%d part(s) in %s: all finished before, nothing to extract", world, args.out)
    if args.merge:
        _merge(args.out, args.merge)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def where() -> str:
        if args.images is None or not writes_parts(args.out, world_processes()):
            return ""
        return (f"the finished parts in {args.out} are kept (never a half-written one): run the same command "
                "again to extract the others")
    return cli.run(lambda: run(args), on_interrupt=where)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
