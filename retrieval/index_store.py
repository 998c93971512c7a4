"""The gallery index on disk: a folder written crash-safely and read back whole.

An index folder holds ``index.faiss``, ``vectors.f16.npy`` (ivf-pq with refine), ``items.npz``
(root, paths relative to it, pids, camids) and ``index.json`` (kind, params, metric, n, d, the
model's metadata). It is written into a hidden sibling folder and renamed into place once complete
(:class:`_Staging`); a build killed on the way leaves its staging folder, which the next build
removes, and an old index it had moved aside comes back (:func:`_recover`). A full disk is one line
with ``--out`` as it was; a missing or damaged file is one line naming it.

The index itself (parameters, build, search) is ``retrieval.index``.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from config import ConfigError
from utils.distance import DistanceSpec
from utils.entry import signals_deferred
from utils.errors import UserError, import_extra
from utils.fileio import follow_umask, open_npz_array

from .index import (
    BLOCK_ELEMS,
    KINDS,
    GalleryIndex,
    Items,
    _NpyWriter,
    _Rows,
    _size,
    _stores_vectors,
    build_index,
)

logger = logging.getLogger("svllreid")

__all__ = ["INDEX_FILE", "VECTORS_FILE", "ITEMS_FILE", "INFO_FILE", "check_index_target", "expected_size",
           "write_index", "save_index", "load_index"]

INDEX_FILE, VECTORS_FILE, ITEMS_FILE, INFO_FILE = "index.faiss", "vectors.f16.npy", "items.npz", "index.json"
FORMAT, VERSION = "svllreid-gallery-index", 1
STAGING_PREFIX, OLD_PREFIX = ".svllreid-partial-index-", ".svllreid-old-index-"
REBUILD = "build it again with tools/build_index.py"


# ----------------------------------------------------------------------------- files
def _fsync(path: str) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(out_dir: str, prefix: str) -> list[tuple[str, int]]:
    parent, name = os.path.split(os.path.abspath(out_dir))
    found = []
    if not os.path.isdir(parent):
        return found
    for entry in os.listdir(parent):
        head = f"{prefix}{name}-"
        if entry.startswith(head) and entry[len(head):].isdigit():
            found.append((os.path.join(parent, entry), int(entry[len(head):])))
    return found


def _recover(out_dir: str) -> None:
    """Tidy after a killed build: its staging folder goes; an old index moved aside but not replaced
    comes back."""
    for path, pid in _siblings(out_dir, STAGING_PREFIX):
        if not _pid_alive(pid) or pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)
    for path, pid in _siblings(out_dir, OLD_PREFIX):
        if not _pid_alive(pid) or pid == os.getpid():
            if not os.path.exists(out_dir):
                os.replace(path, out_dir)
                logger.warning("%s: restored the previous index that an interrupted build had moved aside", out_dir)
            else:
                shutil.rmtree(path, ignore_errors=True)


def check_index_target(out_dir: str) -> None:
    """Refuse an ``--out`` that exists and is not an index folder (it would be replaced)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file, not an index folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, INFO_FILE)):
        raise UserError(f"--out {out_dir} exists and is not an index folder (no {INFO_FILE}): choose another "
                        "folder or remove it")


def _write_files(folder: str, gi: GalleryIndex, extra: dict[str, Any]) -> None:
    """index.faiss, items.npz, vectors (unless already in ``folder``) and index.json into ``folder``."""
    faiss = import_extra("faiss", "index")
    items = gi.items or Items(np.array([""] * gi.n), np.full(gi.n, -1, np.int64), np.full(gi.n, -1, np.int64))
    if len(items) != gi.n or len(items.paths) != gi.n or len(items.camids) != gi.n:
        raise ValueError(f"items ({len(items.paths)} paths, {len(items)} pids) do not match the index's {gi.n}")
    try:
        faiss.write_index(gi.index, os.path.join(folder, INDEX_FILE))
    except RuntimeError as e:           # faiss reports a failed write (a full disk) as a RuntimeError
        text = " ".join(str(e).split())
        why = text[text.find("write error"):] if "write error" in text else text[:200]
        raise _WriteFailed(f"{INDEX_FILE}: {why}") from None
    with open(os.path.join(folder, ITEMS_FILE), "wb") as f:
        np.savez(f, paths=np.asarray(items.paths, dtype=str), pids=np.asarray(items.pids, dtype=np.int64),
                 camids=np.asarray(items.camids, dtype=np.int64), root=np.array(items.root))
    vec = os.path.join(folder, VECTORS_FILE)
    if gi.vectors is not None and not os.path.exists(vec):
        step = max(1, BLOCK_ELEMS // max(1, gi.d))
        with _NpyWriter(vec, gi.vectors.shape, np.float16) as out:
            for s in range(0, gi.n, step):
                out.write(gi.vectors[s:s + step])
    info = {"format": FORMAT, "version": VERSION, "kind": gi.kind, "params": gi.params,
            "metric": gi.metric.as_dict(), "n": gi.n, "d": gi.d, "model": gi.model,
            "junk_left_out": int(gi.junk_left_out), "vectors": VECTORS_FILE if gi.vectors is not None else None,
            "faiss": faiss.__version__, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            **extra}
    with open(os.path.join(folder, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    for name in os.listdir(folder):
        follow_umask(os.path.join(folder, name))
        _fsync(os.path.join(folder, name))


class _WriteFailed(OSError):
    """A file of the index could not be written (faiss's own writer failed)."""


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def _written_or_unchanged(out_dir: str) -> Iterator[None]:
    """A full disk (or a failed write) while an index is written: one line; the staging folder is
    gone by then and ``out_dir`` is as it was (an earlier index in it untouched)."""
    try:
        yield
    except OSError as e:
        if not isinstance(e, _WriteFailed) and e.errno not in _FULL:
            raise
        why = str(e) if isinstance(e, _WriteFailed) else f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
        raise UserError(f"the index could not be written ({why}; is the disk full?); nothing was replaced: "
                        f"{out_dir} is as it was; free some space, or give --out on another disk, and build "
                        "again") from None


def _check_free_space(out_dir: str, need: int) -> None:
    """Refuse, before any building, an index that cannot fit on the disk of ``out_dir``."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if need > free:
        raise UserError(f"the index needs about {_size(need)} and the disk of {parent} has {_size(free)} free: free "
                        "some space or give --out on another disk; nothing was written")


def expected_size(n: int, d: int, params: dict[str, Any], path_chars: int = 64) -> int:
    """About the bytes an index folder of ``n`` vectors of width ``d`` takes (a lower bound used to
    refuse a build that cannot fit): the faiss index, the float16 vectors, the items."""
    if params["kind"] == "flat":
        index = 4 * n * d
    else:
        index = n * (int(params["m"]) * int(params["nbits"]) // 8 + 8) + 4 * int(params["nlist"]) * d
    vectors = 2 * n * d if _stores_vectors(params) else 0
    return index + vectors + n * (16 + 4 * path_chars)


class _Staging:
    """A hidden sibling folder of ``out_dir`` to build in; :meth:`commit` renames it into place (the old
    index is replaced only then); a failure or interruption removes it."""

    def __init__(self, out_dir: str) -> None:
        self.out = os.path.abspath(out_dir)
        parent, name = os.path.split(self.out)
        self.path = os.path.join(parent, f"{STAGING_PREFIX}{name}-{os.getpid()}")

    def __enter__(self) -> _Staging:
        check_index_target(self.out)
        _recover(self.out)
        os.makedirs(self.path)
        return self

    def commit(self) -> None:
        parent, name = os.path.split(self.out)
        old = os.path.join(parent, f"{OLD_PREFIX}{name}-{os.getpid()}")
        with signals_deferred():
            if os.path.exists(self.out):
                os.replace(self.out, old)
            os.replace(self.path, self.out)
            _fsync(parent)              # the renames themselves reach the disk
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_index(out_dir: str, features: np.ndarray | Sequence[np.ndarray], metric: DistanceSpec, params: dict[str, Any],
                items: Items, model: dict[str, Any], junk_left_out: int = 0,
                measure: Callable[[GalleryIndex], dict[str, Any]] | None = None,
                on_chunk: Callable[[int, np.ndarray], None] | None = None) -> GalleryIndex:
    """Build (:func:`build_index`) straight into a hidden sibling of ``out_dir`` (the float16 vectors
    are written there as they are added), write the folder's files, then rename it to ``out_dir``.
    ``measure(index)``, run before the rename, returns entries stored in index.json (recall).
    An index that cannot fit on the disk is refused before the build (:func:`expected_size`); a
    disk that fills up during it is one line, ``out_dir`` left as it was."""
    rows = _Rows(features)
    paths = np.asarray(items.paths)
    chars = paths.dtype.itemsize // 4 if paths.dtype.kind == "U" else 64
    _check_free_space(out_dir, expected_size(rows.n, rows.d, params, chars))
    with _written_or_unchanged(out_dir), _Staging(out_dir) as st:
        gi = build_index(features, metric, params, on_chunk=on_chunk,
                         vectors_path=os.path.join(st.path, VECTORS_FILE) if _stores_vectors(params) else None)
        gi.items, gi.model, gi.junk_left_out = items, dict(model), int(junk_left_out)
        extra = measure(gi) if measure is not None else {}
        _write_files(st.path, gi, extra)
        st.commit()
    del gi                       # freed before the folder is read back: never two indexes in memory
    return load_index(out_dir)


def save_index(out_dir: str, gi: GalleryIndex, extra: dict[str, Any] | None = None) -> None:
    """Write an index built in memory to ``out_dir`` atomically (a hidden sibling, then a rename)."""
    with _written_or_unchanged(out_dir), _Staging(out_dir) as st:
        _write_files(st.path, gi, dict(extra or {}))
        st.commit()


def _damaged(folder: str, name: str, why: str) -> UserError:
    return UserError(f"{os.path.join(folder, name)} is damaged ({' '.join(why.split())[:200]}); {REBUILD}")


def load_index(folder: str) -> GalleryIndex:
    """Read an index folder; a missing or damaged part is refused in one line naming the file (and
    without faiss, the extra to install)."""
    faiss = import_extra("faiss", "index")
    if not os.path.isdir(folder):
        raise UserError(f"no such index folder: {folder} ({REBUILD.replace('build it again', 'build it')})")
    info_path = os.path.join(folder, INFO_FILE)
    if not os.path.isfile(info_path):
        raise UserError(f"{folder} is not an index folder (no {INFO_FILE}); {REBUILD}")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(folder, INFO_FILE, f"not JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _damaged(folder, INFO_FILE, f"not a {FORMAT} description")
    if info.get("version") != VERSION:
        raise UserError(f"{info_path}: index format version {info.get('version')}, this code reads {VERSION}; "
                        f"{REBUILD}")
    try:
        kind, params, n, d = info["kind"], dict(info["params"]), int(info["n"]), int(info["d"])
        m = info["metric"]
        metric = DistanceSpec(bool(m["feat_norm"]), str(m["dist_metric"]))
        model = dict(info.get("model") or {})
        if kind not in KINDS or params.get("kind") != kind:
            raise ValueError(f"kind {kind!r}")
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise _damaged(folder, INFO_FILE, f"bad or missing entry: {e}") from None
    index_path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index_path):
        raise UserError(f"{index_path} is missing; {REBUILD}")
    try:
        index = faiss.read_index(index_path)
    except RuntimeError as e:
        raise _damaged(folder, INDEX_FILE, str(e).splitlines()[0] if str(e) else "unreadable") from None
    expected = faiss.IndexFlat if kind == "flat" else faiss.IndexIVFPQ
    if not isinstance(faiss.downcast_index(index), expected) or index.ntotal != n or index.d != d:
        raise _damaged(folder, INDEX_FILE, f"a {type(faiss.downcast_index(index)).__name__} of {index.ntotal} x "
                       f"{index.d}-d vectors where {INFO_FILE} says {kind} of {n} x {d}")
    items_path = os.path.join(folder, ITEMS_FILE)
    try:
        z = np.load(items_path, allow_pickle=False)
        paths = open_npz_array(items_path, "paths")
        items = Items(paths, np.asarray(z["pids"], np.int64), np.asarray(z["camids"], np.int64), str(z["root"]))
    except FileNotFoundError:
        raise UserError(f"{items_path} is missing; {REBUILD}") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise _damaged(folder, ITEMS_FILE, str(e)) from None
    if not (len(items.paths) == len(items.pids) == len(items.camids) == n):
        raise _damaged(folder, ITEMS_FILE, f"{len(items.paths)} paths, {len(items.pids)} pids, "
                       f"{len(items.camids)} camids for {n} vectors")
    vectors = None
    if info.get("vectors"):
        vec_path = os.path.join(folder, VECTORS_FILE)
        try:
            vectors = np.load(vec_path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"{vec_path} is missing; {REBUILD}") from None
        except (OSError, ValueError) as e:
            raise _damaged(folder, VECTORS_FILE, str(e)) from None
        if vectors.shape != (n, d) or vectors.dtype != np.float16:
            raise _damaged(folder, VECTORS_FILE, f"{vectors.dtype} {vectors.shape}, expected float16 ({n}, {d})")
    if kind == "ivf-pq":
        faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 1))
    return GalleryIndex(index, metric, params, vectors, items, model, int(info.get("junk_left_out", 0)), info,
                        os.path.abspath(folder))
