"""One run per OUTPUT_DIR: an exclusive lock, no silent overwrite, the run's config kept.

A training run owns its OUTPUT_DIR for its lifetime (``fcntl.flock`` on
``OUTPUT_DIR/.lock``, released by the kernel when the process ends, so a killed run
leaves no stale lock). A folder that already holds a run is refused unless the new run
continues it (``--resume``) or starts over (``--overwrite``: the old run's files are
moved into ``OUTPUT_DIR/previous-<time>/``, nothing is deleted). The run's full config
is written to ``OUTPUT_DIR/config.yaml``; ``--resume`` uses it (the rules of what may change
on resuming are the config's: :mod:`config.resume`).
"""
from __future__ import annotations

import fcntl
import glob
import os
import time
from typing import IO, Any

from .checkpoint import metadata_path
from .errors import UserError
from .fileio import atomic_write, remove_stale_temporaries

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
LAST_CHECKPOINT = "last.pth"
# Files only a training run writes (an evaluation folder never holds them).
TRAINING_FILES = (LAST_CHECKPOINT, CONFIG_FILE, "train_log.txt", "metrics.jsonl")
# What an evaluation (test_svllreid.py) writes into its folder.
EVALUATION_FILES = ("results.json", "test_log.txt", "visualize")
# Files that mark a folder as holding a run (besides the *.pth checkpoints).
RUN_FILES = (*TRAINING_FILES, "results.json", "tensorboard", "curves.png")
# Of those, the ones that hold training progress (with the *.pth): without any of them the
# folder holds the leftovers of a run that failed before training, not a run.
PROGRESS_FILES = (LAST_CHECKPOINT, "results.json")

class RunError(UserError, RuntimeError):
    """A training run cannot start or go on as asked (folder in use, run exists, divergence, ...)."""


class RunLock:
    """Exclusive lock on OUTPUT_DIR for the lifetime of a run (use as a context manager)."""

    def __init__(self, output_dir: str, name: str = "OUTPUT_DIR") -> None:
        self.output_dir = output_dir
        self.name = name        # how the user gave the folder (the option), for the error message
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._f: IO[str] | None = None

    def __enter__(self) -> RunLock:
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except (FileExistsError, NotADirectoryError):     # the folder, or a folder above it, is a file
            blocking = next((p for p in _self_and_parents(self.output_dir) if os.path.lexists(p)
                             and not os.path.isdir(p)), self.output_dir)
            raise RunError(f"{self.name} {self.output_dir} cannot be a folder: {blocking} is a file; give "
                           f"another {self.name}") from None
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunError(f"{self.name} {self.output_dir} is in use by another run ({holder}); "
                           f"wait for it to end or choose another {self.name}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._f is not None:
            self._f.close()   # closing releases the lock
            self._f = None


def _self_and_parents(path: str) -> list[str]:
    """``path`` and the folders above it, from the top down."""
    parts = [os.path.abspath(path)]
    while os.path.dirname(parts[-1]) != parts[-1]:
        parts.append(os.path.dirname(parts[-1]))
    return parts[::-1]


def existing_run_files(output_dir: str) -> list[str]:
    """The files in ``output_dir`` that belong to an earlier run (sorted names)."""
    if not os.path.isdir(output_dir):
        return []
    names = {n for n in RUN_FILES if os.path.exists(os.path.join(output_dir, n))}
    weights = glob.glob(os.path.join(glob.escape(output_dir), "*.pth"))
    names |= {os.path.basename(p) for p in weights}
    # the metadata file written beside each weights file goes with it
    names |= {os.path.basename(m) for m in map(metadata_path, weights) if os.path.isfile(m)}
    return sorted(names)


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool) -> list[str]:
    """Check that a run may start in ``output_dir`` (call with the lock held).

    Removes the leftovers of interrupted atomic writes; with ``overwrite``, moves the
    previous run's files into ``previous-<time>/``; so too, without ``overwrite``, the files of
    a run that saved no progress (no checkpoint, no results: it failed before training), which
    do not block a corrected re-run. Returns log lines saying what was done.
    """
    notes = []
    stale = remove_stale_temporaries(output_dir)
    if stale:
        notes.append(f"removed {len(stale)} half-written file(s) of an interrupted write: {', '.join(stale)}")
    files = existing_run_files(output_dir)
    if resume:
        return notes + _resume_without_last_checkpoint(output_dir, files)
    if not files:
        return notes
    if not overwrite and not any(n in PROGRESS_FILES or n.endswith(".pth") for n in files):
        # the leftovers of a run that failed before saving anything (bad data path, bad batch): not a run
        dest = move_aside(output_dir, files)
        notes.append(f"OUTPUT_DIR held only the files of a run that saved no training progress ({', '.join(files)}); "
                     f"moved to {dest}")
        return notes
    if not overwrite:
        shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
        raise RunError(f"OUTPUT_DIR {output_dir} already holds a run ({shown}): add --resume to continue it, "
                       "--overwrite to start over (its files are moved to a previous-<time>/ sub-folder), "
                       "or choose another OUTPUT_DIR")
    dest = move_aside(output_dir, files)
    notes.append(f"--overwrite: the previous run's {len(files)} file(s) were moved to {dest}")
    return notes


def _resume_without_last_checkpoint(output_dir: str, files: list[str]) -> list[str]:
    """``--resume`` of a folder whose run has no ``last.pth`` (deleted to save space, or the run
    stopped between its first weights file and its first ``last.pth``): a finished run
    (``results.json``) is refused, since retraining it would replace its results and weights;
    an unfinished one's files move to ``previous-<time>/`` (``config.yaml`` stays: the run's
    settings) and the run starts from scratch. Returns log lines."""
    if LAST_CHECKPOINT in files or not any(n == "results.json" or n.endswith(".pth") for n in files):
        return []
    if "results.json" in files:
        raise RunError(f"--resume: OUTPUT_DIR {output_dir} holds a finished run (results.json) without its "
                       f"{LAST_CHECKPOINT}, so there is nothing to continue, and retraining would replace its results "
                       "and weights: evaluate its weights with test_svllreid.py, or start over with --overwrite "
                       "(its files are moved to a previous-<time>/ sub-folder)")
    names = [n for n in files if n != CONFIG_FILE]
    dest = move_aside(output_dir, names)
    return [f"--resume: no {LAST_CHECKPOINT} to continue from; the run's earlier files ({', '.join(names)}) were "
            f"moved to {dest}, and the run starts from scratch"]


def move_aside(output_dir: str, names: list[str]) -> str:
    """Move ``names`` (files or folders in ``output_dir``) into a new ``previous-<time>/`` sub-folder.

    Nothing is deleted; a second move within the same second gets ``previous-<time>-2/``.
    Returns the sub-folder.
    """
    base = os.path.join(output_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    dest, n = base, 1
    while True:
        try:
            os.makedirs(dest)
            break
        except FileExistsError:
            n += 1
            dest = f"{base}-{n}"
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest


def previous_evaluation_aside(output_dir: str) -> str | None:
    """Before an evaluation writes into ``output_dir`` (lock held): move an earlier evaluation's
    results.json, test_log.txt and visualize/ into ``previous-<time>/``, so that nothing of it is
    replaced silently and no stale picture stays beside the new ones. Returns a log line, or None."""
    remove_stale_temporaries(output_dir)
    if not any(os.path.exists(os.path.join(output_dir, n)) for n in ("results.json", "visualize")):
        return None
    names = [n for n in EVALUATION_FILES if os.path.exists(os.path.join(output_dir, n))]
    dest = move_aside(output_dir, names)
    return f"{output_dir} held an earlier evaluation: its {', '.join(names)} moved to {dest}"


def save_run_config(output_dir: str, cfg: Any) -> None:
    """Write the run's full config to ``OUTPUT_DIR/config.yaml`` (atomically)."""
    atomic_write(os.path.join(output_dir, CONFIG_FILE), lambda f: f.write(cfg.dump().encode()))
