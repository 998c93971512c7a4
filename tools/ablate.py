"""Ablations in one command: a grid of config variants x seeds, each an ordinary training run.

    python tools/ablate.py --config_file CFG --grid KEY=V1,V2 [--grid KEY=...] --seeds N --out DIR [KEY VALUE ...]
    python tools/ablate.py --config_file CFG --grid_file configs/ablations/svllreid.yml --seeds 3 --out DIR
    python tools/ablate.py --report DIR          # rebuild results.md / .csv / .png from the run folders

Every variant x seed runs ``train_svllreid.py`` in its own folder ``DIR/<variant>/seed_<S>``
(same locking, config saving and resume rules as any run), with SOLVER.SEED = S, from the
grid's resolved config ``DIR/grid_config.yaml`` (an edit of the config file while the grid
runs changes none of its runs). A re-run of the same command skips finished runs and resumes
interrupted ones (``--resume``), so Ctrl-C loses nothing; failed runs are reported, and tried
again with ``--retry_failed``. Each run's folder is checked against its variant: one of other
settings is left out of the report (finished) or started again (begun), as is a begun run
whose data changed. ``--jobs J`` runs J trainings side by side (``--devices cuda:0,cuda:1``
gives each slot its GPU). The report (written after the runs, or any time with ``--report``)
holds mean +- std over seeds, the difference to the baseline variant with Welch's 95%
interval, and the wall time; see docs/ablations.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

import yaml  # noqa: E402

from config import CfgNode, ConfigError, get_key, load_config  # noqa: E402
from config.resume import RESUME_SAFE_KEYS, config_differences  # noqa: E402
from datasets.bases import dataset_change  # noqa: E402
from processor.meters import hms  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import file_sha256  # noqa: E402
from utils.entry import Terminated  # noqa: E402
from utils.errors import import_extra  # noqa: E402
from utils.fileio import atomic_write, save_figure  # noqa: E402
from utils.misc import cuda_problem, write_json_atomic  # noqa: E402
from utils.record import METRICS_FILE, read_metrics  # noqa: E402
from utils.run_dir import CONFIG_FILE, LAST_CHECKPOINT, RunError, RunLock, existing_run_files  # noqa: E402
from utils.stats import summarize, welch_interval  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_svllreid.py")
PLAN_FILE = "ablation.json"      # what the grid is (a re-run must ask for the same)
GRID_CONFIG = "grid_config.yaml"  # the resolved config every run starts from (the plan's ``config``)
MAX_SEEDS = 100
STATUS_FILE = "status.json"      # how each run ended (written by this tool only)
METRICS = ("mAP", "R1", "mINP")


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    folder: str

    @property
    def key(self) -> str:
        return f"{self.variant}/seed_{self.seed}"


# ----------------------------------------------------------------------------- the grid
def split_values(text: str) -> list[str]:
    """``V1,V2`` -> ``['V1', 'V2']``; commas inside brackets belong to the value (``[25, 35],[30, 40]``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def _override(value: Any) -> str:
    """A YAML value of a grid file as the KEY VALUE override string yacs parses back."""
    return value if isinstance(value, str) else repr(value)


def grid_from_args(grid: Sequence[str]) -> dict[str, dict[str, str]]:
    """The variants of ``--grid KEY=V1,V2 ...``: every combination, named ``KEY=V+KEY=V`` (last key part)."""
    axes: list[list[tuple[str, str]]] = []
    for item in grid:
        key, sep, values = item.partition("=")
        vals = split_values(values) if sep else []
        if not key.strip() or not vals or any(v == "" for v in vals):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. MODEL.USE_SSL=True,False)")
        if any(axis[0][0] == key.strip() for axis in axes):   # it would collapse into variants that run one value
            raise ConfigError(f"--grid {item!r}: {key.strip()} is given in two --grid flags; list all its values "
                              f"in one (--grid {key.strip()}=V1,V2,...)")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--grid {item!r}: a value is listed twice")
        axes.append([(key.strip(), v) for v in vals])
    variants: dict[str, dict[str, str]] = {}
    for combo in itertools.product(*axes) if axes else ():
        name = "+".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in combo)
        variants[name] = dict(combo)
    return variants


def grid_from_file(path: str) -> tuple[dict[str, dict[str, str]], str | None]:
    """(variants, baseline) of a grid file: ``{baseline: NAME, variants: {NAME: {KEY: VALUE}}}``."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"grid file {path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"grid file {path}: not a text (YAML) file, byte {e.start} is not UTF-8 text") from None
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"grid file {path} not found (or a folder): give the YAML file of the variants") from None
    variants = (doc or {}).get("variants") if isinstance(doc, dict) else None
    if not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None for v in variants.values()):
        raise ConfigError(f"grid file {path}: expected 'variants:' mapping each name to KEY: VALUE overrides")
    for name, kv in variants.items():
        nested = [str(k) for k, v in (kv or {}).items() if isinstance(v, dict)]
        if nested:   # {MODEL: {USE_SSL: False}}: one override per dotted key, as on the command line
            raise ConfigError(f"grid file {path}: variant {name!r}: {nested[0]} holds a mapping; write each key "
                              f"in full, as on the command line ({nested[0]}.KEY: VALUE)")
    out = {str(n): {str(k): _override(v) for k, v in (kv or {}).items()} for n, kv in variants.items()}
    baseline = doc.get("baseline")
    return out, (str(baseline) if baseline is not None else None)


def folder_name(variant: str) -> str:
    """A file-system-safe folder name for a variant: inside ``--out`` (never ``.``, ``..`` or hidden)."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", variant).lstrip(".").strip("_") or "variant"


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The plan, every variant's config checked: the config file (path and sha256), the overrides,
    the resolved config they give (``config``: what every run starts from, whatever happens to the
    file later), the variants, the baseline and the seeds (the first: SOLVER.SEED)."""
    if args.grid_file and args.grid:
        raise ConfigError("give either --grid_file or --grid, not both")
    if args.grid_file:
        variants, baseline = grid_from_file(args.grid_file)
    else:
        variants, baseline = grid_from_args(args.grid), None
    if not variants:
        raise ConfigError("the grid is empty: give --grid KEY=V1,V2 or a --grid_file with variants")
    baseline = args.baseline or baseline or next(iter(variants))
    if baseline not in variants:
        raise ConfigError(f"baseline {baseline!r} is not a variant of the grid ({', '.join(variants)})")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds {args.seeds}: give 1 to {MAX_SEEDS} (each seed is one training run of "
                          "every variant)")
    names = [folder_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names {', '.join(variants)} give the same folder name twice; rename them")
    keys = args.opts[0::2]
    if "OUTPUT_DIR" in keys or any("OUTPUT_DIR" in kv for kv in variants.values()):
        raise ConfigError("OUTPUT_DIR is set by the ablation (--out); do not give it as an override")
    if any("SOLVER.SEED" in kv for kv in variants.values()):
        raise ConfigError("SOLVER.SEED is set by the ablation (--seeds: SOLVER.SEED, +1, ...); do not put it in "
                          "the grid (the override SOLVER.SEED S sets the first seed)")
    for key in keys:   # the variant's value would silently replace the override
        setting = [name for name, kv in variants.items() if key in kv]
        if setting:
            raise ConfigError(f"{key} is given both as an override and in the grid (variant {setting[0]!r}); "
                              "give it in one place")
    base_cfg = load_config(args.config_file, args.opts)
    seeds = [int(base_cfg.SOLVER.SEED) + i for i in range(args.seeds)]
    for name, kv in variants.items():   # unknown keys, wrong types, refused values: before any work
        try:
            load_config(args.config_file, [*args.opts, *itertools.chain.from_iterable(kv.items())])
        except ConfigError as e:
            raise ConfigError(f"variant {name!r}: {e}") from None
    return {"config_file": os.path.abspath(args.config_file) if args.config_file else "",
            "config_sha256": file_sha256(args.config_file) if args.config_file else "",
            "opts": list(args.opts), "config": base_cfg.dump(), "variants": variants, "baseline": baseline,
            "seeds": seeds}


def check_devices(devices: list[str], config_file: str, opts: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Each ``--devices`` entry as (MODEL.DEVICE, environment) for its job slot, checked before any run:
    a value MODEL.DEVICE refuses, CUDA where there is none, or a GPU number this machine lacks is
    one error. ``cuda:N`` is the N-th GPU visible here: the slot's runs see only it
    (CUDA_VISIBLE_DEVICES) and train on ``cuda:0``, so MODEL.DEVICE_ID does not hide it."""
    slots = []
    for dev in devices:
        try:
            load_config(config_file, [*opts, "MODEL.DEVICE", dev])
        except ConfigError as e:
            raise ConfigError(f"--devices {','.join(devices)}: {e}") from None
        if not dev.startswith("cuda"):
            slots.append((dev, {}))
            continue
        import torch
        problem = cuda_problem()
        if problem:
            raise ConfigError(f"--devices {','.join(devices)}: CUDA cannot be used here ({problem}); give "
                              "--devices cpu or leave --devices out")
        visible = [v.strip() for v in os.environ["CUDA_VISIBLE_DEVICES"].split(",")] \
            if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(torch.cuda.device_count())]
        if dev == "cuda":
            slots.append((dev, {}))
            continue
        number = re.fullmatch(r"cuda:(\d+)", dev)
        if number is None:
            raise ConfigError(f"--devices {','.join(devices)}: {dev!r} is not a device; write cpu, cuda or cuda:N")
        count = min(len(visible), torch.cuda.device_count())
        if int(number.group(1)) >= count:
            raise ConfigError(f"--devices {','.join(devices)}: {dev} does not exist here; this tool sees {count} "
                              f"GPU(s): cuda:0 to cuda:{count - 1}")
        slots.append(("cuda:0", {"CUDA_VISIBLE_DEVICES": visible[int(number.group(1))]}))
    return slots


def runs_of(plan: dict[str, Any], out: str) -> list[Run]:
    return [Run(v, s, os.path.join(out, folder_name(v), f"seed_{s}")) for v in plan["variants"] for s in plan["seeds"]]


def differing_keys(variants: dict[str, dict[str, str]]) -> list[str]:
    """The keys whose value is not the same in every variant (a key a variant leaves out counts as differing)."""
    keys = sorted({k for kv in variants.values() for k in kv})
    return [k for k in keys if len({kv.get(k) for kv in variants.values()}) > 1]


# ----------------------------------------------------------------------------- state on disk
def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is damaged ({e}); move it away to rebuild it") from None


PLAN_KEYS: dict[str, type] = {"config_file": str, "opts": list, "variants": dict, "baseline": str, "seeds": list}


def _plan_problem(plan: Any) -> str:
    """What makes ``plan`` (a loaded ablation.json) not a plan of this tool; empty when it is one."""
    if not isinstance(plan, dict):
        return f"expected a JSON object, found {'null' if plan is None else 'a ' + type(plan).__name__}"
    missing = [k for k in PLAN_KEYS if k not in plan]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = [k for k, kind in PLAN_KEYS.items() if not isinstance(plan[k], kind)]
    if wrong:
        return f"{wrong[0]} is a {type(plan[wrong[0]]).__name__}, not a {PLAN_KEYS[wrong[0]].__name__}"
    if not plan["variants"] or not all(isinstance(kv, dict) for kv in plan["variants"].values()):
        return "variants: expected names mapping to KEY: VALUE overrides"
    if not plan["seeds"] or not all(isinstance(x, int) and not isinstance(x, bool) for x in plan["seeds"]):
        return "seeds: expected a list of integers"
    if plan["baseline"] not in plan["variants"]:
        return f"its baseline {plan['baseline']!r} is not one of its variants"
    if not isinstance(plan.get("config", ""), str):
        return "config: expected the YAML of the grid's config"
    return ""


def read_plan(out: str) -> dict[str, Any] | None:
    """The plan in ``out`` (None: there is none); a file that is not a plan is a one-line error."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"{out} is a file, not the folder of an ablation")
    path = os.path.join(out, PLAN_FILE)
    plan = _read_json(path)
    if plan is None and not os.path.isfile(path):
        return None
    problem = _plan_problem(plan)
    if problem:
        raise RunError(f"{path} is not an ablation plan of this tool ({problem}); move it away, "
                       "or give the folder of an ablation")
    return plan


def read_status(out: str) -> dict[str, Any]:
    """``out``/status.json: how each run ended and what it ran ({} when there is none yet)."""
    path = os.path.join(out, STATUS_FILE)
    status = _read_json(path)
    if status is None and not os.path.isfile(path):
        return {}
    if not isinstance(status, dict) or not all(isinstance(v, dict) for v in status.values()):
        raise RunError(f"{path} is not this tool's record of the runs (expected a JSON object of runs); move it "
                       "away to rebuild it (finished runs are found again from their folders)")
    return status


def grid_config(out: str, plan: dict[str, Any]) -> str:
    """``out``/grid_config.yaml holding the plan's resolved config (written when missing or
    different): the ``--config_file`` of every run, so that an edit of the user's config file
    while the grid runs changes no run of it. Returns its path."""
    path = os.path.join(out, GRID_CONFIG)
    try:
        with open(path) as f:
            same = f.read() == plan["config"]
    except FileNotFoundError:
        same = False
    if not same:
        atomic_write(path, lambda f: f.write(plan["config"].encode()))
    return path


def _same_variants(old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]) -> dict[str, str] | None:
    """New variant name -> old name when both grids hold the same variants (the same overrides, in
    any order: values or --grid flags listed otherwise); None when they do not."""
    if old == new:
        return {name: name for name in new}
    by_overrides = {frozenset(kv.items()): name for name, kv in old.items()}
    if len(by_overrides) != len(old) or len(old) != len(new) \
            or any(frozenset(kv.items()) not in by_overrides for kv in new.values()):
        return None     # (two variants of the same overrides, an A/A check, match by name only)
    return {name: by_overrides[frozenset(kv.items())] for name, kv in new.items()}


def _setting_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(every changed setting as 'KEY old -> new', the keys among them that change what a run computes:
    those outside RESUME_SAFE_KEYS) between two plans' resolved configs."""
    if "config" not in old:   # a plan of an older version: only its config file and overrides are known
        keys = [k for k in ("config_file", "opts") if old[k] != new[k]]
        return [f"{k} {old[k]!r} -> {new[k]!r}" for k in keys], keys
    try:
        old_cfg, new_cfg = CfgNode.load_cfg(old["config"]), CfgNode.load_cfg(new["config"])
        computed = config_differences(old["config"], new_cfg)
    except Exception as e:    # noqa: BLE001 -- any YAML/yacs failure means the same: a damaged plan
        raise RunError(f"the config recorded in {PLAN_FILE} cannot be read ({' '.join(str(e).split())[:120]}); "
                       f"move {PLAN_FILE} away, or choose another --out") from None

    def where_and_how(cfg: Any) -> dict[str, Any]:   # the keys a config of another version may lack are left out
        return {k: get_key(cfg, k) for k in RESUME_SAFE_KEYS - {"OUTPUT_DIR"} if _has_key(cfg, k)}
    a, b = where_and_how(old_cfg), where_and_how(new_cfg)
    safe = [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return [f"{k} {x!r} -> {y!r}" for k, x, y in [*computed, *safe]], [k for k, _, _ in computed]


def _has_key(cfg: Any, key: str) -> bool:
    try:
        get_key(cfg, key)
    except KeyError:
        return False
    return True


def claim_out(out: str, plan: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Write the plan into ``out``, or check that ``out`` holds this grid; returns (the plan in
    force, whether its settings changed: failed runs are then tried again).

    The same grid has the same variants (listed in any order; the folder keeps its variant
    names) and seeds. Its settings (config file, overrides) may change where no run of the grid
    has finished, and at any time in the keys that say where and how a run runs, not what it
    computes (RESUME_SAFE_KEYS: the data folder, workers, device); a line says what changed.
    The baseline is a choice of the report: it may always change.
    """
    old = read_plan(out)
    if old is None:
        if os.path.isdir(out) and (existing_run_files(out) or os.path.isfile(os.path.join(out, "results.json"))):
            raise RunError(f"--out {out} holds a training run, not an ablation; choose another --out")
        write_json_atomic(os.path.join(out, PLAN_FILE), plan)
        if "config" in plan:
            grid_config(out, plan)
        return plan, False
    names = _same_variants(old["variants"], plan["variants"])
    differ = (["variants"] if names is None else []) + (["seeds"] if old["seeds"] != plan["seeds"] else [])
    if differ:
        raise RunError(f"--out {out} holds another grid ({PLAN_FILE} differs in: {', '.join(differ)}); "
                       "re-run with the same arguments to continue it, or choose another --out")
    assert names is not None
    plan = {**plan, "variants": {names[n]: kv for n, kv in plan["variants"].items()},
            "baseline": names[plan["baseline"]]}
    changes, computed = _setting_changes(old, plan)
    if computed:
        done = [r.key for r in runs_of(old, out) if os.path.isfile(os.path.join(r.folder, "results.json"))]
        if done:
            raise RunError(f"--out {out} holds another grid: its settings differ in {', '.join(computed)} and "
                           f"{len(done)} of its runs have finished ({done[0]}{', ...' if len(done) > 1 else ''}); "
                           "re-run with the same settings to continue it, or choose another --out")
        print(f"ablation: no run of this grid has finished, so its changed settings apply to every run "
              f"(runs begun with the old ones start again): {'; '.join(changes)}", flush=True)
    elif changes:
        print(f"ablation: changed where or how the runs run, not what they compute: {'; '.join(changes)}",
              flush=True)
    if plan["baseline"] != old["baseline"]:
        print(f"ablation: baseline {plan['baseline']} (was {old['baseline']}); only the report changes", flush=True)
    if plan != old:
        write_json_atomic(os.path.join(out, PLAN_FILE), plan)
    if "config" in plan:
        grid_config(out, plan)
    return plan, bool(changes)


def run_overrides(plan: dict[str, Any], run: Run) -> list[str]:
    """The KEY VALUE overrides that make the grid's config the config of ``run``: its variant's and its seed."""
    return [*itertools.chain.from_iterable(plan["variants"][run.variant].items()), "SOLVER.SEED", str(run.seed)]


def run_mismatch(plan: dict[str, Any], out: str, run: Run) -> list[str]:
    """How the run in ``run.folder`` differs from what its variant and seed run, from its saved
    config.yaml (keys outside RESUME_SAFE_KEYS, as 'KEY = its value (variant: value)'): a run copied
    in from elsewhere, or begun with other settings. Empty when it matches, or holds no config.yaml."""
    saved = os.path.join(run.folder, CONFIG_FILE)
    if "config" not in plan or not os.path.isfile(saved):
        return []
    expected = load_config(grid_config(out, plan), run_overrides(plan, run))
    try:
        with open(saved) as f:
            diffs = config_differences(f.read(), expected)
    except Exception:    # noqa: BLE001 -- any read/YAML/yacs failure means the same: not this variant's run
        return [f"its {CONFIG_FILE} cannot be read"]
    return [f"{k} = {theirs!r} (variant: {ours!r})" for k, theirs, ours in diffs]


def run_state(run: Run, status: dict[str, Any]) -> str:
    """'done' (results.json), 'failed' (last attempt failed), 'partial' (last.pth: resume) or 'new'."""
    if os.path.isfile(os.path.join(run.folder, "results.json")):
        return "done"
    if status.get(run.key, {}).get("state") == "failed":
        return "failed"
    if os.path.isfile(os.path.join(run.folder, LAST_CHECKPOINT)):
        return "partial"
    return "new"


# ----------------------------------------------------------------------------- running
def command(plan: dict[str, Any], out: str, run: Run, state: str, device: str | None) -> list[str]:
    """The train_svllreid.py command line for ``run``: a fresh start, or ``--resume`` ('partial').

    Both give the grid's config (grid_config.yaml) with the run's overrides: a resumed run checks
    that its saved settings are these, and takes the new values of the keys that may change."""
    cmd = [sys.executable, TRAIN, "--config_file", grid_config(out, plan), *run_overrides(plan, run),
           "OUTPUT_DIR", run.folder, *(["MODEL.DEVICE", device] if device else [])]
    if state == "partial":
        cmd.append("--resume")
    elif os.path.isdir(run.folder) and existing_run_files(run.folder):   # an earlier start that failed or
        cmd.append("--overwrite")            # was begun with other settings: its files go to previous-<time>/
    return cmd


def _last_error(log_path: str) -> str:
    """The child's one-line error (``error: ...`` / ``interrupted``), else its last line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith(("error:", "interrupted")):
            return ln
    return lines[-1] if lines else ""


def _interrupt_when_parent_dies() -> None:
    """In a training's process (Linux): a Ctrl-C when this tool dies, even by ``kill -9``, so the
    training stops as after a Ctrl-C (its last.pth complete) instead of running on unattended."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _checked_state(plan: dict[str, Any], out: str, run: Run, state: str, status: dict[str, Any]) -> str:
    """``state`` after checking the run's folder against its variant: a finished run of other settings
    (copied in from elsewhere) is 'foreign' and left out; a begun one ('partial') of other settings,
    or on data that changed since it began, is started again ('new': its files are moved aside)."""
    if state not in ("done", "partial"):
        return state
    why = run_mismatch(plan, out, run)
    if why and state == "done":
        print(f"  left out {run.key}: it does not match its variant ({'; '.join(why[:3])}); move it away "
              "to run it", flush=True)
        return "foreign"
    reason = f"it was begun with other settings ({'; '.join(why[:3])})" if why else \
        data_change(plan, out, run, status) if state == "partial" else ""
    if reason:
        print(f"  restart {run.key} from scratch: {reason}; its files go to a previous-<time>/ sub-folder",
              flush=True)
        return "new"
    return state


def data_identity(plan: dict[str, Any], out: str, run: Run) -> dict[str, Any] | None:
    """The identity of the data ``run`` trains on, as it is now (:func:`datasets.bases.dataset_identity`:
    name, query/gallery files, cameras, training identities and a digest of every image, as a
    training's last.pth keeps it for ``--resume``); None when the data cannot be read (the
    training then says why)."""
    from datasets.bases import dataset_identity
    from datasets.make_dataloader import build_dataset_from_cfg
    cfg = load_config(grid_config(out, plan), [*run_overrides(plan, run), "OUTPUT_DIR", run.folder])
    log = logging.getLogger("svllreid")
    level = log.level
    log.setLevel(logging.ERROR)    # what loading the data warns about (split statistics) is the run's to log
    try:
        return dataset_identity(build_dataset_from_cfg(cfg), content=True)
    except cli.USER_ERRORS:
        return None
    finally:
        log.setLevel(level)


def data_change(plan: dict[str, Any], out: str, run: Run, status: dict[str, Any]) -> str:
    """Why a begun run must not be resumed on the data there now: the data it began on (recorded in
    status.json when it started) and that data differ (:func:`datasets.bases.dataset_change`), as
    when the data was regenerated at the same path after a kill. Empty when they do not, or when
    either is unknown."""
    saved = (status.get(run.key, {}).get("ran") or {}).get("data")
    now = data_identity(plan, out, run) if saved else None
    change = dataset_change(saved, now) if now else ""
    return f"its data changed since it began ({change})" if change else ""


def _config_file_note(plan: dict[str, Any]) -> Callable[[], str]:
    """A function to call before each start: one line, the first time the user's ``--config_file``
    is found changed since the grid began (its runs keep using the grid's copy of the config)."""
    told: list[bool] = []

    def note() -> str:
        path, digest = plan["config_file"], plan.get("config_sha256")
        if told or not path or not digest:
            return ""
        try:
            now = file_sha256(path)
        except OSError:
            now = ""
        if now == digest:
            return ""
        told.append(True)
        return (f"  note: {path} {'changed' if now else 'is gone'} since this grid began; its runs keep the "
                f"config the grid began with ({GRID_CONFIG})")
    return note


def execute(plan: dict[str, Any], out: str, jobs: int, slots: list[tuple[str, dict[str, str]]],
            retry_failed: bool) -> None:
    """Run every unfinished run, ``jobs`` at a time (``slots``: each job slot's MODEL.DEVICE and
    environment, from :func:`check_devices`); status.json records how each ended and what it ran.

    When the first run to end fails and no run of the grid has finished before, the runs not
    yet started are not started (their cause is most likely shared)."""
    status_path = os.path.join(out, STATUS_FILE)
    status = read_status(out)
    runs = runs_of(plan, out)
    states = {r.key: run_state(r, status) for r in runs}
    if retry_failed:
        states = {k: ("new" if s == "failed" else s) for k, s in states.items()}
    states = {r.key: _checked_state(plan, out, r, states[r.key], status) for r in runs}
    todo = [r for r in runs if states[r.key] in ("new", "partial")]
    n_var, n_seed = len(plan["variants"]), len(plan["seeds"])
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "partial", "new", "failed", "foreign")}
    foreign = f", {counts['foreign']} not of this grid (left out)" if counts["foreign"] else ""
    print(f"ablation: {n_var} variants x {n_seed} seeds = {len(runs)} runs in {out}; "
          f"{counts['done']} finished, {counts['partial']} to resume, {counts['new']} to start, "
          f"{counts['failed']} failed earlier (not retried{'' if retry_failed else '; --retry_failed'}){foreign}",
          flush=True)
    print(f"  differing keys: {', '.join(differing_keys(plan['variants'])) or '(none)'}; "
          f"baseline: {plan['baseline']}; seeds: {', '.join(map(str, plan['seeds']))}", flush=True)
    if not todo:
        return
    config_note = _config_file_note(plan)
    env = dict(os.environ)
    if jobs > 1 and not slots and "OMP_NUM_THREADS" not in env:   # share the CPU cores between the jobs
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    pending, active, n_done, run_seconds = list(todo), {}, 0, 0.0
    t0 = time.time()
    try:
        while pending or active:
            while pending and len(active) < jobs:
                slot = next(i for i in range(jobs) if i not in {a[3] for a in active.values()})
                run = pending.pop(0)
                device, device_env = slots[slot % len(slots)] if slots else (None, {})
                shown = device_env.get("CUDA_VISIBLE_DEVICES")
                shown = f"GPU {shown}" if shown else device
                note = config_note()
                if note:
                    print(note, flush=True)
                os.makedirs(os.path.dirname(run.folder), exist_ok=True)
                cmd = command(plan, out, run, states[run.key], device)
                # what the run runs, recorded before it starts (a kill -9 of this tool loses none of it);
                # a resumed run keeps the data it began on
                before = status.get(run.key, {})
                resumed = states[run.key] == "partial"
                began_on = (before.get("ran") or {}).get("data") if resumed else None
                status[run.key] = {**before, "ran": {
                    "config_file": plan["config_file"], "config_sha256": plan.get("config_sha256", ""),
                    "grid_config_sha256": file_sha256(grid_config(out, plan)),
                    "overrides": run_overrides(plan, run), "device": shown, "resumed": resumed,
                    "data": began_on or data_identity(plan, out, run)}}
                write_json_atomic(status_path, status)
                log = os.path.join(os.path.dirname(run.folder), f"seed_{run.seed}.log")
                with open(log, "a") as lf:
                    lf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.key} ({states[run.key]})\n")
                    lf.flush()
                    # in the user's working folder (relative paths mean what they mean in their shell);
                    # own session: a Ctrl-C on the terminal reaches this process only, which
                    # passes exactly one signal on to each training (below)
                    proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env={**env, **device_env},
                                            start_new_session=True, preexec_fn=_interrupt_when_parent_dies)
                print(f"  start  {run.key}{' (resume)' if states[run.key] == 'partial' else ''}"
                      f"{' on ' + shown if shown else ''}", flush=True)
                active[proc.pid] = (proc, run, time.time(), slot, log)
            time.sleep(0.2)
            for pid, (proc, run, started, _, log) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del active[pid]
                seconds = time.time() - started
                entry = status.get(run.key, {})
                entry.update(seconds=round(entry.get("seconds", 0.0) + seconds, 1),
                             attempts=entry.get("attempts", 0) + 1, returncode=rc)
                if rc == 0 and os.path.isfile(os.path.join(run.folder, "results.json")):
                    entry.update(state="done", message="")
                    n_done += 1
                    run_seconds += seconds
                    left = len(pending) + len(active)   # estimated from the mean finished run
                    eta = f"; about {hms(run_seconds / n_done * math.ceil(left / jobs))} left" if left else ""
                    print(f"  done   {run.key} in {seconds:.0f} s{eta}", flush=True)
                elif rc in (130, 143, -signal.SIGINT, -signal.SIGTERM):   # stopped by a signal of its own
                    raise KeyboardInterrupt
                else:
                    entry.update(state="failed", message=_last_error(log))
                    print(f"  FAILED {run.key} (exit {rc}): {entry['message']} (log: {log})", flush=True)
                    if pending and n_done == 0 and counts["done"] == 0:
                        # no run of the grid has ever finished: the cause (data, device, disk) is
                        # most likely shared, so do not start the others
                        print(f"  not starting the other {len(pending)} run(s): no run of this grid has "
                              "finished yet; fix the cause and run the same command again", flush=True)
                        pending.clear()
                status[run.key] = entry
                write_json_atomic(status_path, status)
    except KeyboardInterrupt as e:
        # pass the Ctrl-C / SIGTERM on to each training and let it finish its last.pth
        sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        for proc, *_ in active.values():
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc, *_ in active.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    print(f"ablation: {n_done} run(s) finished in {(time.time() - t0) / 60:.1f} min", flush=True)


# ----------------------------------------------------------------------------- the report
def run_metrics(run: Run) -> dict[str, float] | None:
    """mAP, R1 and mINP of a finished run (from its results.json), else None."""
    res = _read_json(os.path.join(run.folder, "results.json"))
    if not isinstance(res, dict) or "mAP" not in res:
        return None
    cmc = res.get("cmc") or [math.nan]
    return {"mAP": float(res["mAP"]), "R1": float(cmc[0]), "mINP": float(res.get("mINP", math.nan))}


def _wall_seconds(run: Run, status: dict[str, Any]) -> float:
    if run.key in status and "seconds" in status[run.key]:
        return float(status[run.key]["seconds"])
    path = os.path.join(run.folder, METRICS_FILE)
    recs = read_metrics(path) if os.path.isfile(path) else []
    return float(recs[-1].get("elapsed", math.nan)) if recs else math.nan


def load_plan(out: str, baseline: str = "") -> dict[str, Any]:
    """The plan of the ablation in ``out`` for a report, with ``baseline`` (a variant) in place of its own."""
    plan = read_plan(out)
    if plan is None:
        raise RunError(f"{out} holds no ablation ({PLAN_FILE} not found)")
    if baseline and baseline not in plan["variants"]:
        raise ConfigError(f"--baseline {baseline!r} is not a variant of the ablation in {out} "
                          f"({', '.join(plan['variants'])})")
    return {**plan, "baseline": baseline or plan["baseline"]}


def build_report(out: str, baseline: str = "") -> list[dict[str, Any]]:
    """One row per variant, rebuilt from the run folders (and status.json for failures); a finished
    run whose config.yaml is not its variant's (:func:`run_mismatch`) is left out and named."""
    plan = load_plan(out, baseline)
    status = read_status(out)
    runs = runs_of(plan, out)
    per_variant: dict[str, dict[str, Any]] = {}
    for v in plan["variants"]:
        mine = [r for r in runs if r.variant == v]
        got = {r.seed: run_metrics(r) for r in mine}
        foreign = {r.seed: run_mismatch(plan, out, r) for r in mine if got[r.seed] is not None}
        mismatched = [f"seed {s}: {'; '.join(why[:3])}" for s, why in foreign.items() if why]
        got = {s: (None if foreign.get(s) else g) for s, g in got.items()}
        failed = [f"seed {r.seed}: {status[r.key].get('message', '')}" for r in mine
                  if got[r.seed] is None and status.get(r.key, {}).get("state") == "failed"]
        missing = [r.seed for r in mine if got[r.seed] is None and not foreign.get(r.seed)
                   and status.get(r.key, {}).get("state") != "failed"]
        values = {m: [g[m] for g in got.values() if g is not None] for m in METRICS}
        per_variant[v] = {"runs": mine, "values": values, "failed": failed, "missing": missing,
                          "mismatched": mismatched, "left_out": [s for s, why in foreign.items() if why],
                          "seconds": [_wall_seconds(r, status) for r in mine if got[r.seed] is not None]}
    base = per_variant[plan["baseline"]]["values"]
    rows = []
    for v, d in per_variant.items():
        row: dict[str, Any] = {"variant": v, "baseline": v == plan["baseline"],
                               "overrides": plan["variants"][v], "n": len(d["values"]["mAP"]),
                               "runs": len(d["runs"]), "failed": d["failed"], "missing": d["missing"],
                               "mismatched": d["mismatched"], "left_out": d["left_out"],
                               "per_seed": {m: d["values"][m] for m in METRICS},
                               "wall_s": summarize(d["seconds"]).mean}
        for m in METRICS:
            s = summarize(d["values"][m])
            diff, lo, hi = welch_interval(d["values"][m], base[m])
            row.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_diff": diff, f"{m}_lo": lo, f"{m}_hi": hi})
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def _mean_std(row: dict[str, Any], m: str) -> str:
    mean, std = row[f"{m}_mean"], row[f"{m}_std"]
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} ± {_pct(std)}"


def _diff(row: dict[str, Any], m: str) -> str:
    if row["baseline"]:
        return "(baseline)"
    d, lo, hi = row[f"{m}_diff"], row[f"{m}_lo"], row[f"{m}_hi"]
    if math.isnan(d):
        return "n/a"
    return f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" if not math.isnan(lo) else f"{100 * d:+.1f} [n/a]"


def write_report(out: str, baseline: str = "") -> list[str]:
    """Write results.md, results.csv and results.png into ``out`` (differences against ``baseline``,
    default the plan's); returns their paths."""
    rows = build_report(out, baseline)
    plan = load_plan(out, baseline)
    md = [f"# Ablation: {os.path.basename(plan['config_file']) or 'defaults'}, "
          f"{len(rows)} variants x {len(plan['seeds'])} seeds ({', '.join(map(str, plan['seeds']))})", "",
          "Mean ± sample std over seeds (%). Δ: difference of means to the baseline with Welch's 95% "
          "interval; an interval that contains 0 does not show a difference.", "",
          "| variant | n | mAP | R1 | mINP | Δ mAP [95% CI] | Δ R1 [95% CI] | wall time / run | note |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = "; ".join([f"{len(r['failed'])} FAILED ({' / '.join(r['failed'])})"] if r["failed"] else []
                         + ([f"{len(r['missing'])} not run yet (seeds {', '.join(map(str, r['missing']))})"]
                            if r["missing"] else [])
                         + ([f"{len(r['mismatched'])} left out, not of this variant ({' / '.join(r['mismatched'])})"]
                            if r["mismatched"] else []))
        wall = "n/a" if math.isnan(r["wall_s"]) else f"{r['wall_s']:.0f} s"
        md.append(f"| {r['variant']} | {r['n']}/{r['runs']} | {_mean_std(r, 'mAP')} | {_mean_std(r, 'R1')} | "
                  f"{_mean_std(r, 'mINP')} | {_diff(r, 'mAP')} | {_diff(r, 'R1')} | {wall} | {note} |")
    md += ["", "Overrides of each variant:", ""]
    md += [f"- **{r['variant']}**: " + (", ".join(f"`{k} {v}`" for k, v in r["overrides"].items()) or "(none)")
           for r in rows]
    paths = [os.path.join(out, n) for n in ("results.md", "results.csv", "results.png")]
    text = "\n".join(md) + "\n"
    atomic_write(paths[0], lambda f: f.write(text.encode()))
    cols = ["variant", "baseline", "n", "runs"] + [f"{m}_{s}" for m in METRICS for s in
                                                  ("mean", "std", "diff", "lo", "hi")] + ["wall_s", "failed", "missing",
                                                                                         "mismatched"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([("; ".join(r[c]) if c in ("failed", "mismatched") else " ".join(map(str, r[c]))
                     if c == "missing" else r[c]) for c in cols])
    atomic_write(paths[1], lambda f: f.write(buf.getvalue().encode()))
    _plot(out, plan, rows, paths[2])
    return paths


def _plot(out: str, plan: dict[str, Any], rows: list[dict[str, Any]], path: str) -> None:
    """Bars (mean, std error bars) with each seed as a point for mAP and R1, and every run's mAP per epoch."""
    import_extra("matplotlib", "record").use("Agg")
    plt = import_extra("matplotlib.pyplot", "record")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = range(len(rows))
    for ax, m in zip(axes[:2], ("mAP", "R1")):
        means = [100 * r[f"{m}_mean"] if r["n"] else 0 for r in rows]
        stds = [100 * r[f"{m}_std"] if r["n"] > 1 else 0 for r in rows]
        ax.bar(x, means, yerr=stds, capsize=4, color=["#999" if r["baseline"] else "#4a7ab5" for r in rows])
        for i, r in enumerate(rows):
            pts = [100 * v for v in r["per_seed"][m]]
            ax.plot([i] * len(pts), pts, "k.", alpha=0.7)
            if r["failed"]:
                ax.annotate("failed", (i, 1), ha="center", color="red", fontsize=8)
        ax.set_xticks(list(x), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{m} (%)")
        ax.set_title(f"{m}: mean ± std, points = seeds")
    ax = axes[2]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        for run in (x for x in runs_of(plan, out) if x.variant == r["variant"] and x.seed not in r["left_out"]):
            p = os.path.join(run.folder, METRICS_FILE)
            recs = [e for e in (read_metrics(p) if os.path.isfile(p) else [])
                    if e.get("kind") == "eval" and e.get("stage") == 2 and "mAP" in e]
            if recs:
                label = r["variant"] if run.seed == plan["seeds"][0] else None
                ax.plot([e["epoch"] for e in recs], [100 * e["mAP"] for e in recs], "-o", ms=3,
                        color=colors[i % len(colors)], alpha=0.8, label=label)
    ax.set_xlabel("stage-2 epoch")
    ax.set_ylabel("mAP (%)")
    ax.set_title("every run's evaluations (metrics.jsonl)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run a grid of config variants x seeds and report mean ± std.")
    p.add_argument("--config_file", default="", help="the config every variant starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a key and its values (repeatable: every combination is a variant)")
    p.add_argument("--grid_file", default="", help="YAML: {baseline: NAME, variants: {NAME: {KEY: VALUE}}}")
    p.add_argument("--baseline", default="", help="the variant differences are measured against (default: the first)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant: SOLVER.SEED, +1, ... (default 1)")
    p.add_argument("--out", default="", help="folder of the ablation (one sub-folder per variant and seed)")
    p.add_argument("--jobs", type=int, default=1, help="trainings side by side (default 1)")
    p.add_argument("--devices", default="", help="comma-separated MODEL.DEVICE per job slot, e.g. cuda:0,cuda:1")
    p.add_argument("--retry_failed", action="store_true", help="run failed runs again")
    p.add_argument("--report", default="", metavar="DIR", help="only rebuild the report of the ablation in DIR")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every variant: KEY VALUE ...")
    return cli.parse_with_overrides(p, argv)   # flags also accepted after the overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        import_extra("scipy", "ablate")     # the report's intervals: said before any run, not after hours
        if args.report:   # --baseline: the differences against another variant (the plan keeps its own)
            for path in write_report(args.report, args.baseline):
                print(path)
            return
        if not args.out:
            raise ConfigError("--out is required: the folder that holds the ablation's runs")
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give at least 1")
        if len(args.opts) % 2:
            raise ConfigError(f"overrides come in KEY VALUE pairs; got {len(args.opts)} words: {' '.join(args.opts)}")
        plan = make_plan(args)
        slots = check_devices([d.strip() for d in args.devices.split(",") if d.strip()], args.config_file, args.opts)
        out = os.path.abspath(args.out)    # the runs work in the user's folder too, whatever their own cwd
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"--out {args.out} is a file; give the folder for the ablation's runs")
        with RunLock(out, "--out"):
            plan, changed = claim_out(out, plan)
            execute(plan, out, args.jobs, slots, args.retry_failed or changed)
            paths = write_report(out)
        print("report: " + ", ".join(paths))
        with open(paths[0]) as f:
            print(f.read())
        rows = build_report(out)
        failed, missing = sum(len(r["failed"]) for r in rows), sum(len(r["missing"]) for r in rows)
        foreign = sum(len(r["mismatched"]) for r in rows)
        if failed or missing or foreign:
            what = " and ".join([f"{failed} run(s) failed and {missing} did not run"] if failed or missing else []
                                + ([f"{foreign} run(s) not of their variant were left out"] if foreign else []))
            how = [h for h, n in (("--retry_failed repeats the failed ones", failed), ("it continues", missing),
                                  ("move the runs left out away to run them", foreign)) if n]
            raise RunError(f"{what} (see {paths[0]} and the runs' logs); fix the cause and run the same command "
                           f"again ({'; '.join(how)})")

    def interrupted() -> str:
        return (f"the finished runs are kept and interrupted ones keep their last.pth; "
                f"run the same command again to continue (--out {args.out})")
    return cli.run(run, on_interrupt=interrupted)


if __name__ == "__main__":
    sys.exit(main())
