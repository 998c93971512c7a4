"""Resuming a run: which config keys may change, and the checks of a saved run's config.

A resumed run keeps what it computes; only where things are and how they are run may
differ (:data:`RESUME_SAFE_KEYS`). :func:`resume_config` builds the config of the run to
resume from its saved ``config.yaml``; :func:`check_train_state` refuses a ``last.pth``
written with other settings.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from utils.run_dir import CONFIG_FILE, LAST_CHECKPOINT, RunError

from . import ConfigError, get_key, load_config

__all__ = ["RESUME_SAFE_KEYS", "config_differences", "check_train_state", "resume_config"]

# Keys that may differ when a run is resumed: where things are and how they are run,
# not what is computed (the trained weights do not depend on them).
RESUME_SAFE_KEYS = frozenset({
    "OUTPUT_DIR", "MODEL.DEVICE", "MODEL.DEVICE_ID", "MODEL.DIST_TIMEOUT", "MODEL.PRETRAIN_PATH",
    "DATASETS.ROOT_DIR", "DATALOADER.NUM_WORKERS", "DATALOADER.READ_RETRIES",
    "SOLVER.STAGE1.LOG_PERIOD", "SOLVER.STAGE2.LOG_PERIOD",
    "SOLVER.STAGE1.CHECKPOINT_PERIOD", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "SOLVER.STAGE2.EVAL_PERIOD",
    "TEST.IMS_PER_BATCH", "TEST.RE_RANKING", "TEST.RE_RANKING_K1", "TEST.RE_RANKING_K2",
    "TEST.RE_RANKING_LAMBDA", "SOLVER.COMPILE", "SOLVER.DETERMINISTIC",
})



def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _written_keys(path: str) -> set[str]:
    """The dotted keys the YAML file at ``path`` itself holds (not the defaults merged under them)."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    return set(_flatten(doc)) if isinstance(doc, dict) else set()


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
            saved_path = os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE)
            if not os.path.isfile(saved_path):     # the run's settings are lost, not last.pth foreign
                raise RunError(f"--resume: {saved_path} is missing, so the run's settings were taken from the "
                               f"command line, and they are not those {path} was written with: {shown}{more}; put "
                               "the run's config.yaml back, or give the --config_file and overrides the run was "
                               "started with")
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
        written = _written_keys(saved_path)
        if key in written:
            saved_value = f"the run's saved value {flat_saved.get(key)!r} ({saved_path})"
        else:     # the value is the default standing in for a key the file lacks: say so, not "saved"
            lacking = len(set(flat_saved) - written)
            saved_value = (f"the run's value {flat_saved.get(key)!r}, the default: {saved_path} does not have "
                           f"{key} ({lacking} of {len(flat_saved)} keys missing: written by an older version, or "
                           "cut off; then put the run's own config.yaml back)")
        raise ConfigError(f"--resume: {key} = {flat_given[key]!r} conflicts with {saved_value}; a resumed run "
                          f"keeps its settings — only these may change: {', '.join(sorted(RESUME_SAFE_KEYS))}")
    for key in keys:
        if key in RESUME_SAFE_KEYS:
            parent, _, leaf = key.rpartition(".")
            (get_key(saved, parent) if parent else saved)[leaf] = get_key(given, key)
    saved.freeze()
    return saved
