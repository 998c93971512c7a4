"""Feature files written in parts by several processes, and any mix of feature files read as one.

A sharded extraction (``torchrun ... tools/extract_features.py --out DIR``) writes one part per
rank, ``DIR/part-RRRRR-of-WWWWW.npz``: each a :class:`FeatureSet` of a contiguous share of the
sorted image list, so that the parts concatenated in rank order are the one-process file.
:func:`load_features` reads single ``.npz`` files and part folders alike and refuses, in one
line, anything that would mix features that are not comparable (another width or model).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils.errors import UserError

from .features import FeatureSet

__all__ = ["PART_RE", "SHARD_KEY", "part_name", "parse_part_name", "scan_parts", "part_paths", "model_meta",
           "meta_difference", "concat", "read_feature_sets", "load_features", "shard_bounds", "list_digest",
           "files_stat", "shard_meta", "part_problem", "merge_parts"]

PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.npz$")
# The meta key of a part that says which share of the image list it holds; not part of the model's meta.
SHARD_KEY = "shard"
# Per-part entries of the shard meta (the rest is the same in every part of one extraction).
_PER_PART = ("rank", "start", "stop", "files_stat")


def part_name(rank: int, world: int) -> str:
    """The file name of rank ``rank``'s part out of ``world``: ``part-00000-of-00002.npz``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return f"part-{rank:05d}-of-{world:05d}.npz"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(rank, world) of a part file name (:func:`part_name`), else None."""
    m = PART_RE.match(os.path.basename(name))
    if m is None:
        return None
    rank, world = int(m.group(1)), int(m.group(2))
    return (rank, world) if 0 <= rank < world else None


def scan_parts(directory: str) -> dict[int, dict[int, str]]:
    """The part files in ``directory``: {world size: {rank: path}} (other files are ignored)."""
    out: dict[int, dict[int, str]] = {}
    for name in sorted(os.listdir(directory)):
        rw = parse_part_name(name)
        if rw is not None and os.path.isfile(os.path.join(directory, name)):
            out.setdefault(rw[1], {})[rw[0]] = os.path.join(directory, name)
    return out


def part_paths(directory: str) -> list[str]:
    """The paths of a complete set of parts in ``directory``, in rank order.

    Refused in one line: no parts, parts of several world sizes, a missing part (listed).
    """
    found = scan_parts(directory)
    if not found:
        raise UserError(f"{directory} holds no feature parts (part-RRRRR-of-WWWWW.npz written by "
                        "tools/extract_features.py with several processes)")
    if len(found) > 1:
        sizes = ", ".join(f"{len(found[w])} of {w}" for w in sorted(found))
        raise UserError(f"{directory} mixes parts of several extractions (world sizes: {sizes}); keep the parts "
                        "of one and remove the others")
    world, ranks = next(iter(found.items()))
    missing = [part_name(r, world) for r in range(world) if r not in ranks]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UserError(f"{directory}: {len(missing)} of {world} parts missing: {shown} (run the extraction again "
                        "with the same number of processes to write them)")
    return [ranks[r] for r in range(world)]


def model_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` without the part's place in the image list (:data:`SHARD_KEY`)."""
    return {k: v for k, v in meta.items() if k != SHARD_KEY}


def meta_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first difference between two feature files' model meta ('key: A vs B'), or None.

    Every key either holds is compared; the checkpoint path ('weight') is left out when both
    name the checkpoint by its content ('sha256'), since machines may keep it at other paths.
    """
    a, b = model_meta(a), model_meta(b)
    skip = {"weight"} if a.get("sha256") and b.get("sha256") else set()
    for k in sorted((set(a) | set(b)) - skip):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            return f"{k}: {va!r} vs {vb!r}"
    return None


def _join_roots(sets: Sequence[FeatureSet]) -> tuple[str, list[list[str]], list[list[tuple[str, str]]]]:
    """One root for several sets and each set's paths (and failed files) relative to it."""
    roots = {fs.root for fs in sets}
    if len(roots) == 1:
        return sets[0].root, [fs.paths for fs in sets], [fs.failed for fs in sets]
    if all(r and os.path.isabs(r) for r in roots):
        root = os.path.commonpath(sorted(roots))
    else:
        root = ""

    def move(fs: FeatureSet, p: str) -> str:
        full = os.path.join(fs.root, p)
        return os.path.relpath(full, root) if root else full
    return (root, [[move(fs, p) for p in fs.paths] for fs in sets],
            [[(move(fs, p), r) for p, r in fs.failed] for fs in sets])


def concat(sets: Sequence[FeatureSet]) -> FeatureSet:
    """The sets one after the other (no checks: see :func:`load_features`). Sets of other folders
    get their common folder as root; the part place (:data:`SHARD_KEY`) leaves the meta."""
    if not sets:
        raise ValueError("nothing to concatenate")
    root, paths, failed = _join_roots(sets)
    width = sets[0].features.shape[1]
    return FeatureSet(np.concatenate([fs.features.reshape(-1, width) for fs in sets]).astype(np.float32, copy=False),
                      [p for ps in paths for p in ps],
                      np.concatenate([fs.pids for fs in sets]).astype(np.int64),
                      np.concatenate([fs.camids for fs in sets]).astype(np.int64),
                      root, [f for fs in failed for f in fs], model_meta(sets[0].meta))


def _check_parts(directory: str, paths: Sequence[str], sets: Sequence[FeatureSet]) -> None:
    """The parts of one folder come from one extraction: each holds the share its name says."""
    first = None
    for path, fs in zip(paths, sets):
        shard = fs.meta.get(SHARD_KEY)
        if not isinstance(shard, dict):
            continue            # a part written without its place: nothing more to compare
        rank, world = parse_part_name(path) or (-1, -1)
        if shard.get("rank") != rank or shard.get("world") != world:
            raise UserError(f"{path}: holds the part {shard.get('rank')} of {shard.get('world')}, not {rank} of "
                            f"{world} as its name says; write the parts again")
        common = {k: v for k, v in shard.items() if k not in _PER_PART}
        if first is None:
            first = (path, common)
        elif common != first[1]:
            diff = next(k for k in sorted(set(common) | set(first[1])) if common.get(k) != first[1].get(k))
            raise UserError(f"{first[0]} and {path} come from different image lists ({diff}: "
                            f"{first[1].get(diff)!r} vs {common.get(diff)!r}); write {directory} again")


def read_feature_sets(paths: Sequence[str], mmap: bool = False) -> tuple[list[FeatureSet], list[str]]:
    """The feature sets of ``paths`` (``.npz`` files and folders of parts, in the order given, the
    parts of a folder in rank order) with the file each came from, checked: complete part folders,
    no file given twice (also as a part of a folder given), the same feature width and model meta
    everywhere (:func:`meta_difference`); refusals are one line naming the two files. ``mmap``: the
    features stay on disk (memory-mapped)."""
    if not paths:
        raise UserError("no feature files given")
    sets: list[FeatureSet] = []
    names: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files = part_paths(p)
            part_sets = [FeatureSet.load(f, allow_empty=True, mmap=mmap) for f in files]
            _check_parts(p, files, part_sets)
            sets += part_sets
            names += files
        else:
            sets.append(FeatureSet.load(p, allow_empty=True, mmap=mmap))
            names.append(p)
    first: dict[str, str] = {}
    for name in names:
        real = os.path.realpath(name)
        if real in first:
            raise UserError(f"{first[real]} and {name} are the same feature file, given twice: its images would be "
                            "in twice; give each file or folder of parts once")
        first[real] = name
    ref, ref_name = sets[0], names[0]
    for fs, name in zip(sets[1:], names[1:]):
        if fs.features.shape[1] != ref.features.shape[1]:
            raise UserError(f"{ref_name} and {name} have features of different widths "
                            f"({ref.features.shape[1]} vs {fs.features.shape[1]}): they come from different models")
        diff = meta_difference(ref.meta, fs.meta)
        if diff is not None:
            raise UserError(f"{ref_name} and {name} were extracted differently ({diff}): their features are "
                            "not comparable")
    return sets, names


def load_features(paths: Sequence[str]) -> FeatureSet:
    """One :class:`FeatureSet` of several feature files, in the order given.

    Each path is a ``.npz`` of ``tools/extract_features.py`` or a folder of parts (all the parts
    of one world size, concatenated in rank order). Every input must have the same feature width
    and model meta (:func:`read_feature_sets`); an empty result is refused.
    """
    sets, _ = read_feature_sets(paths)
    out = concat(sets)
    if len(out.paths) == 0:
        shown = ", ".join(paths[:4]) + (" ..." if len(paths) > 4 else "")
        raise UserError(f"{shown}: no features (0 images) in all; extract them from a folder with readable images")
    return out


# ----------------------------------------------------------------------------- writing parts
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous share of ``n`` files: the shares are disjoint, cover
    every file and follow each other in rank order (``files[r*n//W:(r+1)*n//W]``)."""
    return rank * n // world, (rank + 1) * n // world


def list_digest(files: Sequence[str]) -> str:
    """A hash of an image list (the names, in order): parts of one extraction share it."""
    h = hashlib.sha1()
    for f in files:
        h.update(f.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def files_stat(root: str, files: Sequence[str]) -> str:
    """A hash of the size and modification time (ns) of each of ``files`` (relative to ``root``): an
    image replaced or re-cropped under the same name changes it. A file gone counts as changed."""
    h = hashlib.sha1()
    for f in files:
        try:
            st = os.stat(os.path.join(root, f))
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{f}\0gone\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def shard_meta(files: Sequence[str], rank: int, world: int, digest: str | None = None,
               root: str | None = None) -> dict[str, Any]:
    """The place of rank ``rank``'s part in the sorted image list ``files`` (:data:`SHARD_KEY` of its
    meta); with the images' folder ``root``, also what its images were when it was extracted
    (:func:`files_stat` of its share), so that a part whose images changed is extracted again."""
    start, stop = shard_bounds(len(files), rank, world)
    out: dict[str, Any] = {"rank": rank, "world": world, "start": start, "stop": stop, "total": len(files),
                           "list_sha1": digest or list_digest(files)}
    if root is not None:
        out["files_stat"] = files_stat(root, files[start:stop])
    return out


def part_problem(path: str, meta: dict[str, Any], files: Sequence[str],
                 partial: bool = False) -> tuple[str | None, bool]:
    """(why the finished part ``path`` is not the part that ``meta`` (model meta with
    :data:`SHARD_KEY`) and this shard's ``files`` would give now, or None when it is; whether its
    images changed since it was extracted, under the same names: then it is extracted again).

    ``partial``: ``meta`` holds only some model keys (what is known before the model is loaded);
    only those are compared.
    """
    fs = FeatureSet.load(path, allow_empty=True)
    want, have = meta[SHARD_KEY], fs.meta.get(SHARD_KEY)
    if not isinstance(have, dict):
        return "it does not say which images it holds", False
    if have.get("total") != want["total"] or have.get("list_sha1") != want["list_sha1"]:
        return (f"it was extracted from another image list ({have.get('total')} files then, {want['total']} "
                "now)"), False
    if (have.get("rank"), have.get("world"), have.get("start"), have.get("stop")) != \
            (want["rank"], want["world"], want["start"], want["stop"]):
        return f"it holds files {have.get('start')}..{have.get('stop')}, not {want['start']}..{want['stop']}", False
    if fs.features.ndim != 2 or fs.features.shape[1] != meta.get("feat_dim", fs.features.shape[1]):
        return f"its features are {fs.features.shape[1]} wide, the model's {meta.get('feat_dim')}", False
    diff = meta_difference({k: v for k, v in fs.meta.items() if k in meta} if partial else fs.meta, meta)
    if diff is not None:
        return f"it was extracted differently ({diff})", False
    if sorted(fs.paths + [p for p, _ in fs.failed]) != sorted(files):
        return "its images are not this shard's", False
    return None, have.get("files_stat") != want.get("files_stat")


def merge_parts(directory: str, out: str) -> FeatureSet:
    """Write the complete parts of ``directory`` as one ``.npz`` at ``out`` (atomically): the
    file one process would have written. Returns the merged set."""
    fs = load_features([directory])
    fs.save(out)
    return fs
