"""Atomic file writes shared by checkpoints, JSON results and configs.

A file is written to a hidden temporary file in the same folder and renamed over the
target, so a reader (or a run killed mid-write) never sees half a file. The temporary
name has a fixed prefix so that leftovers of a killed write can be found and removed
at the next start (:func:`remove_stale_temporaries`). Files get the permissions the
process umask gives ordinary files (not ``mkstemp``'s 0600), so teammates sharing a
results folder can read them.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any

from .entry import signals_deferred

TMP_PREFIX = ".svllreid-partial-"
TMP_SUFFIX = ".tmp"
_LOW_SPACE = 16 << 20   # bytes: below this after a failed write, the disk is taken as full


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(path: str) -> None:
    """Give ``path`` the permissions the umask gives ordinary files (for files made with ``mkstemp``, 0600)."""
    os.chmod(path, _file_mode())


def ctrl_c_deferred() -> contextlib.AbstractContextManager[None]:
    """Hold a Ctrl-C (SIGINT) or SIGTERM until the block is done, then raise it.

    A signal inside ``torch.save`` surfaces as an unrelated write error and loses the
    file; deferred, the write completes and the run stops right after it
    (:func:`utils.entry.signals_deferred`).
    """
    return signals_deferred()


def append_error(path: str, e: OSError) -> OSError:
    """``e``, raised while appending to ``path`` (a log, ``metrics.jsonl``), as an ``OSError``
    whose one-line message names the file (Python's own ENOSPC message does not)."""
    if e.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on device while writing {path} (the lines written "
                                     "before are kept; free some space and resume the run)")
    return OSError(e.errno, f"cannot write {path}: {e.strerror or ' '.join(str(e).split())}")


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any failure the temporary file is removed and ``path`` keeps its previous content.
    A full disk becomes ``OSError(ENOSPC)`` naming the file (torch's own message for it,
    ``inline_container.cc ... unexpected pos``, says nothing useful).
    A Ctrl-C during the write takes effect once the file is complete (:func:`ctrl_c_deferred`).
    """
    with ctrl_c_deferred():
        _atomic_write(path, write)


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """:func:`atomic_write` without the Ctrl-C deferral."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(d).free < _LOW_SPACE
        _remove(tmp)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path} "
                                        "(the previous version of the file, if any, is kept)") from None
        if isinstance(e, OSError):
            raise
        raise OSError(f"cannot write {path}: {' '.join(str(e).split())}") from e
    except BaseException:
        _remove(tmp)
        raise


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG through :func:`atomic_write` (fast zlib level; PNG stays lossless)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, facecolor="white",
                                             pil_kwargs={"compress_level": 1}))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that killed atomic writes left in ``folder``; returns their names."""
    found = sorted(glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*" + TMP_SUFFIX)))
    for p in found:
        _remove(p)
    return [os.path.basename(p) for p in found]


def open_npz_array(path: str, key: str) -> Any:
    """The array ``key`` of the ``.npz`` file ``path``, memory-mapped read-only when the archive stores
    it uncompressed (``np.savez``), so a member larger than memory can be read in slices; a compressed
    member is read into memory. ``KeyError`` when the archive has no such member."""
    import zipfile

    import numpy as np
    member = key + ".npy"
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        stored = info.compress_type == zipfile.ZIP_STORED
        if not stored:
            with zf.open(member) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)     # the local file header: its name and extra field lengths end it
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: member {member} has no local header")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
            int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return np.load(path, allow_pickle=False)[key]
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: member {member} holds Python objects")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
