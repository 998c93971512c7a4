"""Ablations in one command: a grid of config variants x seeds, each an ordinary training run.

    python tools/ablate.py --config_file CFG --grid KEY=V1,V2 [--grid KEY=...] --seeds N --out DIR [KEY VALUE ...]
    python tools/ablate.py --config_file CFG --grid_file configs/ablations/svllreid.yml --seeds 3 --out DIR
    python tools/ablate.py --report DIR          # rebuild results.md / .csv / .png from the run folders

Every variant x seed runs ``train_svllreid.py`` in its own folder ``DIR/<variant>/seed_<S>``
(same locking, config saving and resume rules as any run), with SOLVER.SEED = S. A re-run of
the same command skips finished runs and resumes interrupted ones (``--resume``), so Ctrl-C
loses nothing; failed runs are reported, and tried again with ``--retry_failed``. ``--jobs J``
runs J trainings side by side (``--devices cuda:0,cuda:1`` gives each slot its device). The
report (written after the runs, or any time with ``--report``) holds mean +- std over seeds,
the difference to the baseline variant with Welch's 95% interval, and the wall time; see
docs/ablations.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

import yaml  # noqa: E402

from config import ConfigError, load_config  # noqa: E402
from utils import cli  # noqa: E402
from utils.entry import Terminated  # noqa: E402
from utils.errors import import_extra  # noqa: E402
from utils.fileio import atomic_write, save_figure  # noqa: E402
from utils.misc import write_json_atomic  # noqa: E402
from utils.record import METRICS_FILE, read_metrics  # noqa: E402
from utils.run_dir import LAST_CHECKPOINT, RunError, RunLock, existing_run_files  # noqa: E402
from utils.stats import summarize, welch_interval  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_svllreid.py")
PLAN_FILE = "ablation.json"      # what the grid is (a re-run must ask for the same)
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
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        vals = split_values(values) if sep else []
        if not key.strip() or not vals or any(v == "" for v in vals):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. MODEL.USE_SSL=True,False)")
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
    variants = (doc or {}).get("variants") if isinstance(doc, dict) else None
    if not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None for v in variants.values()):
        raise ConfigError(f"grid file {path}: expected 'variants:' mapping each name to KEY: VALUE overrides")
    out = {str(n): {str(k): _override(v) for k, v in (kv or {}).items()} for n, kv in variants.items()}
    baseline = doc.get("baseline")
    return out, (str(baseline) if baseline is not None else None)


def folder_name(variant: str) -> str:
    """A file-system-safe folder name for a variant."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", variant).strip("_") or "variant"


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The plan (config, overrides, variants, baseline, seeds), every variant's config checked."""
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
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: give at least 1")
    names = [folder_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names {', '.join(variants)} give the same folder name twice; rename them")
    for key in ("OUTPUT_DIR", "SOLVER.SEED"):
        if key in args.opts[0::2] or any(key in kv for kv in variants.values()):
            raise ConfigError(f"{key} is set by the ablation (--out, --seeds); do not give it as an override")
    base_cfg = load_config(args.config_file, args.opts)
    seeds = [int(base_cfg.SOLVER.SEED) + i for i in range(args.seeds)]
    for name, kv in variants.items():   # unknown keys, wrong types, refused values: before any work
        try:
            load_config(args.config_file, [*args.opts, *itertools.chain.from_iterable(kv.items())])
        except ConfigError as e:
            raise ConfigError(f"variant {name!r}: {e}") from None
    return {"config_file": os.path.abspath(args.config_file) if args.config_file else "",
            "opts": list(args.opts), "variants": variants, "baseline": baseline, "seeds": seeds}


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


def claim_out(out: str, plan: dict[str, Any]) -> None:
    """Write the plan into ``out``, or check that ``out`` holds this same grid."""
    path = os.path.join(out, PLAN_FILE)
    old = _read_json(path)
    if old is None:
        if os.path.isdir(out) and (existing_run_files(out) or os.path.isfile(os.path.join(out, "results.json"))):
            raise RunError(f"--out {out} holds a training run, not an ablation; choose another --out")
        write_json_atomic(path, plan)
        return
    differ = [k for k in ("config_file", "opts", "variants", "baseline", "seeds") if old.get(k) != plan[k]]
    if differ:
        raise RunError(f"--out {out} holds another grid ({PLAN_FILE} differs in: {', '.join(differ)}); "
                       "re-run with the same arguments to continue it, or choose another --out")


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
def command(plan: dict[str, Any], run: Run, state: str, device: str | None) -> list[str]:
    """The train_svllreid.py command line for ``run``: a fresh start or ``--resume``."""
    dev = ["MODEL.DEVICE", device] if device else []
    if state == "partial":
        return [sys.executable, TRAIN, "--resume", "OUTPUT_DIR", run.folder, *dev]
    cmd = [sys.executable, TRAIN]
    if plan["config_file"]:
        cmd += ["--config_file", plan["config_file"]]
    cmd += [*plan["opts"], *itertools.chain.from_iterable(plan["variants"][run.variant].items()),
            "SOLVER.SEED", str(run.seed), "OUTPUT_DIR", run.folder, *dev]
    if os.path.isdir(run.folder) and existing_run_files(run.folder):   # a start that failed earlier
        cmd.append("--overwrite")
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


def execute(plan: dict[str, Any], out: str, jobs: int, devices: list[str], retry_failed: bool) -> None:
    """Run every unfinished run, ``jobs`` at a time; status.json records how each ended.

    When the first run to end fails and no run of the grid has finished before, the runs not
    yet started are not started (their cause is most likely shared)."""
    status_path = os.path.join(out, STATUS_FILE)
    status: dict[str, Any] = _read_json(status_path) or {}
    runs = runs_of(plan, out)
    states = {r.key: run_state(r, status) for r in runs}
    if retry_failed:
        states = {k: ("new" if s == "failed" else s) for k, s in states.items()}
    todo = [r for r in runs if states[r.key] in ("new", "partial")]
    n_var, n_seed = len(plan["variants"]), len(plan["seeds"])
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "partial", "new", "failed")}
    print(f"ablation: {n_var} variants x {n_seed} seeds = {len(runs)} runs in {out}; "
          f"{counts['done']} finished, {counts['partial']} to resume, {counts['new']} to start, "
          f"{counts['failed']} failed earlier (not retried{'' if retry_failed else '; --retry_failed'})", flush=True)
    print(f"  differing keys: {', '.join(differing_keys(plan['variants'])) or '(none)'}; "
          f"baseline: {plan['baseline']}; seeds: {', '.join(map(str, plan['seeds']))}", flush=True)
    if not todo:
        return
    env = dict(os.environ)
    if jobs > 1 and not devices and "OMP_NUM_THREADS" not in env:   # share the CPU cores between the jobs
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    pending, active, n_done, run_seconds = list(todo), {}, 0, 0.0
    t0 = time.time()
    try:
        while pending or active:
            while pending and len(active) < jobs:
                slot = next(i for i in range(jobs) if i not in {a[3] for a in active.values()})
                run = pending.pop(0)
                device = devices[slot % len(devices)] if devices else None
                os.makedirs(os.path.dirname(run.folder), exist_ok=True)
                log = os.path.join(os.path.dirname(run.folder), f"seed_{run.seed}.log")
                with open(log, "a") as lf:
                    lf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.key} ({states[run.key]})\n")
                    lf.flush()
                    # own session: a Ctrl-C on the terminal reaches this process only, which
                    # passes exactly one signal on to each training (below)
                    proc = subprocess.Popen(command(plan, run, states[run.key], device), stdout=lf,
                                            stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
                                            preexec_fn=_interrupt_when_parent_dies)
                print(f"  start  {run.key}{' (resume)' if states[run.key] == 'partial' else ''}"
                      f"{' on ' + device if device else ''}", flush=True)
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
                    eta = f"; about {run_seconds / n_done * math.ceil(left / jobs) / 60:.0f} min left" if left else ""
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


def build_report(out: str) -> list[dict[str, Any]]:
    """One row per variant, rebuilt from the run folders (and status.json for failures)."""
    plan = _read_json(os.path.join(out, PLAN_FILE))
    if plan is None:
        raise RunError(f"{out} holds no ablation ({PLAN_FILE} not found)")
    status = _read_json(os.path.join(out, STATUS_FILE)) or {}
    runs = runs_of(plan, out)
    per_variant: dict[str, dict[str, Any]] = {}
    for v in plan["variants"]:
        mine = [r for r in runs if r.variant == v]
        got = {r.seed: run_metrics(r) for r in mine}
        failed = [f"seed {r.seed}: {status[r.key].get('message', '')}" for r in mine
                  if got[r.seed] is None and status.get(r.key, {}).get("state") == "failed"]
        missing = [r.seed for r in mine if got[r.seed] is None and status.get(r.key, {}).get("state") != "failed"]
        values = {m: [g[m] for g in got.values() if g is not None] for m in METRICS}
        per_variant[v] = {"runs": mine, "values": values, "failed": failed, "missing": missing,
                          "seconds": [_wall_seconds(r, status) for r in mine if got[r.seed] is not None]}
    base = per_variant[plan["baseline"]]["values"]
    rows = []
    for v, d in per_variant.items():
        row: dict[str, Any] = {"variant": v, "baseline": v == plan["baseline"],
                               "overrides": plan["variants"][v], "n": len(d["values"]["mAP"]),
                               "runs": len(d["runs"]), "failed": d["failed"], "missing": d["missing"],
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


def write_report(out: str) -> list[str]:
    """Write results.md, results.csv and results.png into ``out``; returns their paths."""
    rows = build_report(out)
    plan = _read_json(os.path.join(out, PLAN_FILE))
    md = [f"# Ablation: {os.path.basename(plan['config_file']) or 'defaults'}, "
          f"{len(rows)} variants x {len(plan['seeds'])} seeds ({', '.join(map(str, plan['seeds']))})", "",
          "Mean ± sample std over seeds (%). Δ: difference of means to the baseline with Welch's 95% "
          "interval; an interval that contains 0 does not show a difference.", "",
          "| variant | n | mAP | R1 | mINP | Δ mAP [95% CI] | Δ R1 [95% CI] | wall time / run | note |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = "; ".join([f"{len(r['failed'])} FAILED ({' / '.join(r['failed'])})"] if r["failed"] else []
                         + ([f"{len(r['missing'])} not run yet (seeds {', '.join(map(str, r['missing']))})"]
                            if r["missing"] else []))
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
                                                  ("mean", "std", "diff", "lo", "hi")] + ["wall_s", "failed", "missing"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([("; ".join(r[c]) if c == "failed" else " ".join(map(str, r[c])) if c == "missing"
                     else r[c]) for c in cols])
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
        for run in (x for x in runs_of(plan, out) if x.variant == r["variant"]):
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
        if args.report:
            for path in write_report(args.report):
                print(path)
            return
        if not args.out:
            raise ConfigError("--out is required: the folder that holds the ablation's runs")
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give at least 1")
        if len(args.opts) % 2:
            raise ConfigError(f"overrides come in KEY VALUE pairs; got {len(args.opts)} words: {' '.join(args.opts)}")
        plan = make_plan(args)
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        with RunLock(args.out):
            claim_out(args.out, plan)
            execute(plan, args.out, args.jobs, devices, args.retry_failed)
            paths = write_report(args.out)
        print("report: " + ", ".join(paths))
        with open(paths[0]) as f:
            print(f.read())
        rows = build_report(args.out)
        failed, missing = sum(len(r["failed"]) for r in rows), sum(len(r["missing"]) for r in rows)
        if failed or missing:
            raise RunError(f"{failed} run(s) failed and {missing} did not run (see {paths[0]} and the "
                           f"runs' logs); fix the cause and run the same command again "
                           f"({'--retry_failed repeats the failed ones' if failed else 'it continues'})")

    def interrupted() -> str:
        return (f"the finished runs are kept and interrupted ones keep their last.pth; "
                f"run the same command again to continue (--out {args.out})")
    return cli.run(run, on_interrupt=interrupted)


if __name__ == "__main__":
    sys.exit(main())
