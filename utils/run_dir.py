"""One run per OUTPUT_DIR: an exclusive lock, no silent overwrite, the run's config kept.

A training run owns its OUTPUT_DIR for its lifetime (``fcntl.flock`` on
``OUTPUT_DIR/.lock``, released by the kernel when the process ends, so a killed run
leaves no stale lock). A folder that already holds a run is refused unless the new run
continues it (``--resume``) or starts over (``--overwrite``: the old run's files are
moved into ``OUTPUT_DIR/previous-<time>/``, nothing is deleted). The run's full config
is written to ``OUTPUT_DIR/config.yaml``; ``--resume`` uses it.
"""
from __future__ import annotations

import fcntl
import glob
import os
import time
from typing import IO, Any

from config import ConfigError, get_key, load_config

from .checkpoint import metadata_path
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

# Keys that may differ when a run is resumed: where things are and how they are run,
# not what is computed (the trained weights do not depend on them).
RESUME_SAFE_KEYS = frozenset({
    "OUTPUT_DIR", "MODEL.DEVICE", "MODEL.DEVICE_ID", "MODEL.DIST_TIMEOUT", "MODEL.PRETRAIN_PATH",
    "DATASETS.ROOT_DIR", "DATALOADER.NUM_WORKERS", "DATALOADER.READ_RETRIES",
    "SOLVER.STAGE1.LOG_PERIOD", "SOLVER.STAGE2.LOG_PERIOD",
    "SOLVER.STAGE1.CHECKPOINT_PERIOD", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "SOLVER.STAGE2.EVAL_PERIOD",
    "TEST.IMS_PER_BATCH", "TEST.RE_RANKING", "TEST.RE_RANKING_K1", "TEST.RE_RANKING_K2",
    "TEST.RE_RANKING_LAMBDA",
})


class RunError(RuntimeError):
    """A training run cannot start or go on as asked (folder in use, run exists, divergence, ...)."""


class RunLock:
    """Exclusive lock on OUTPUT_DIR for the lifetime of a run (use as a context manager)."""

    def __init__(self, output_dir: str, name: str = "OUTPUT_DIR") -> None:
        self.output_dir = output_dir
        self.name = name        # how the user gave the folder (the option), for the error message
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._f: IO[str] | None = None

    def __enter__(self) -> "RunLock":
        os.makedirs(self.output_dir, exist_ok=True)
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
    if resume or not files:
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


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved_yaml: str, cfg: Any) -> list[tuple[str, Any, Any]]:
    """The keys outside :data:`RESUME_SAFE_KEYS` where the config dump ``saved_yaml`` and ``cfg``
    differ, as ``(key, saved value, cfg value)``; empty when they describe the same run. Keys
    that only one of the two has (a config of another code version) are not compared."""
    node_type = type(cfg)
    saved = _flatten(node_type._load_cfg_from_yaml_str(saved_yaml))
    own = _flatten(node_type._load_cfg_from_yaml_str(cfg.dump()))
    return [(key, saved[key], value) for key, value in own.items()
            if key not in RESUME_SAFE_KEYS and key in saved and saved[key] != value]


def check_train_state(state: dict[str, Any], cfg: Any, path: str) -> None:
    """Refuse a training state (``last.pth``) that is not a state of the run ``cfg`` describes.

    Its own config (saved inside it) must equal the run's on every key outside
    :data:`RESUME_SAFE_KEYS` (a ``last.pth`` copied from another run, or a hand-edited
    ``config.yaml``), and its position must exist in this run (a stage the run has, an epoch
    not beyond that stage's MAX_EPOCHS). The :class:`RunError` names the file and the key.
    """
    stage, epoch = state.get("stage"), state.get("epoch")
    saved_cfg = state.get("config")
    if isinstance(saved_cfg, str) and saved_cfg.strip():
        try:
            diffs = config_differences(saved_cfg, cfg)
        except Exception as e:     # noqa: BLE001 -- any YAML/yacs failure means the same: unreadable config
            raise RunError(f"{path}: its saved config cannot be read ({' '.join(str(e).split())[:120]})") from None
        if diffs:
            shown = "; ".join(f"{key} = {theirs!r} (run: {ours!r})" for key, theirs, ours in diffs[:4])
            more = f"; ... (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
            raise RunError(f"{path} does not belong to this run: it was written with {shown}{more}, where run values "
                           f"are those of {os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE)} and the command line; --resume "
                           "continues only a state written with the run's own settings (start over with --overwrite, "
                           "or put back the run's last.pth / config.yaml)")
    if stage not in (1, 2) or not isinstance(epoch, int) or epoch < 1:
        raise RunError(f"{path}: stage {stage!r}, epoch {epoch!r} is not a training position (stage 1 or 2, "
                       "epoch >= 1): not a last.pth written by train_svllreid.py")
    if stage == 1 and not cfg.MODEL.PROMPT_LEARNING:
        raise RunError(f"{path} holds stage 1 epoch {epoch}, but this run has no stage 1 "
                       "(MODEL.PROMPT_LEARNING False): it is another run's state")
    max_epochs = int(get_key(cfg, f"SOLVER.STAGE{stage}.MAX_EPOCHS"))
    if epoch > max_epochs:
        raise RunError(f"{path} holds stage {stage} epoch {epoch}, beyond this run's SOLVER.STAGE{stage}.MAX_EPOCHS "
                       f"{max_epochs}: it is another run's state")


def resume_config(config_file: str, opts: list[str]) -> Any:
    """The config of a run to resume: its saved ``config.yaml`` plus the allowed overrides.

    OUTPUT_DIR comes from the overrides (or the config file). What the user gives is
    compared with the saved run: with a config file, every key of the resulting config;
    without one, the keys given on the command line. A difference in a key outside
    :data:`RESUME_SAFE_KEYS` is refused, naming the key and both values. Returns None when
    the folder has no saved config but a ``last.pth`` (a run of an older version): the given
    config is used. A folder with neither is refused at once (:class:`RunError`).
    """
    given = load_config(config_file or None, opts, freeze=False)
    saved_path = os.path.join(given.OUTPUT_DIR, CONFIG_FILE)
    if not os.path.isfile(saved_path):
        if not os.path.isfile(os.path.join(given.OUTPUT_DIR, LAST_CHECKPOINT)):
            what = "does not exist" if not os.path.isdir(given.OUTPUT_DIR) else \
                f"holds no run to continue (no {CONFIG_FILE}, no {LAST_CHECKPOINT})"
            raise RunError(f"--resume: OUTPUT_DIR {given.OUTPUT_DIR} {what}; give the folder of the run to "
                           "continue, or start a new run without --resume")
        return None
    try:
        saved = load_config(saved_path, freeze=False)
    except ConfigError as e:
        raise ConfigError(f"--resume: the saved config cannot be read ({e})") from None
    flat_given, flat_saved = _flatten(given), _flatten(saved)
    keys = flat_given if config_file else [k for k in opts[0::2]]
    for key in keys:
        if key in RESUME_SAFE_KEYS or flat_given[key] == flat_saved.get(key):
            continue
        raise ConfigError(f"--resume: {key} = {flat_given[key]!r} conflicts with the run's saved value "
                          f"{flat_saved.get(key)!r} ({saved_path}); a resumed run keeps its settings — only "
                          f"these may change: {', '.join(sorted(RESUME_SAFE_KEYS))}")
    for key in keys:
        if key in RESUME_SAFE_KEYS:
            parent, _, leaf = key.rpartition(".")
            (get_key(saved, parent) if parent else saved)[leaf] = get_key(given, key)
    saved.freeze()
    return saved
