"""Bench: gallery retrieval at archive scale, a faiss index (retrieval.index) vs brute force.

Synthetic ReID-like features: identity clusters (a centre in a 64-d latent space, about 20
members each, member noise, projected to ``--dim`` = 1280 with isotropic noise, L2-normalised),
a gallery of each ``--sizes`` and ``--queries`` held-out members of the gallery's identities.
The gallery is generated in chunks straight into a float16 ``.npy`` on disk (1M x 1280 float32
would be 5.1 GB; float16 halves it) and every contender reads it from there in chunks or
memory-mapped; nothing holds it whole in memory except the contenders that need it so (flat,
and today's brute-force search). Distances: the defaults (TEST.FEAT_NORM yes, squared euclidean).

Contenders, each in its own subprocess (peak RSS per contender: ``ru_maxrss`` of the child,
which counts the memory-mapped file pages it touched, and the peak of its anonymous memory,
sampled every 50 ms from /proc):

* ``floor``: the bare matrix product of the queries with the gallery (float32, normalised,
  chunk by chunk; only the products are timed), for single queries and the batch. The same
  pass gives the exact top-10 (``torch.topk`` of the products), the reference for recall.
* ``search.py``: today's brute force, ``DistanceSpec.matrix`` + ``ranked_indices`` (a full sort)
  + top-k, as ``tools/search.py`` ranks a ``--gallery``; run where it fits in memory.
* ``flat``: ``retrieval.index`` kind flat (exact), built in memory, written with ``save_index``.
* ``ivf-pq``: kind ivf-pq with exact float16 re-ranking (refine), built and written with
  ``write_index`` (the vectors go straight to the index folder). The parameters are
  ``choose_params``' defaults for the size, as tools/build_index.py chooses them (``--nlist``
  etc. override them).

Per contender: build time (build + write), index size on disk, single-query latency p50/p99,
the batch of all queries (seconds and ms per query), recall@1/10 against the exact top-10,
peak memory. Then an nprobe sweep of the ivf-pq index (batch recall@10 and ms per query), and
whether the goal is reached: at the largest size recall@10 >= 0.95 at <= 20 ms per single
query with peak memory below the float32 gallery.

    .venv/bin/python bench/gallery_index.py                  # 100k and 1M (about 10 min on 2 cores)
    .venv/bin/python bench/gallery_index.py --sizes 2000     # seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

GB = 1e9
K = 10                      # recall@10 needs the exact top-10
CHUNK = 65536               # gallery rows per generated / scanned chunk
LATENT, PER_ID, MEMBER_NOISE, ISO_NOISE = 64, 20, 0.5, 0.15
GOAL_RECALL10, GOAL_MS = 0.95, 20.0
FLOOR_SINGLES = 20          # single-query products timed by the floor (each one pass over the gallery)


# ----------------------------------------------------------------------------- data
def make_data(workdir: Path, n: int, d: int, num_queries: int, seed: int = 0) -> tuple[Path, Path]:
    """Write the gallery (float16 ``.npy``, chunk by chunk) and the queries (float32 ``.npy``) of size ``n``."""
    rng = np.random.default_rng(seed)
    ids = max(1, n // PER_ID)
    centres = torch.from_numpy(rng.standard_normal((ids, LATENT), dtype=np.float32))
    proj = torch.from_numpy(rng.standard_normal((LATENT, d), dtype=np.float32)) / LATENT ** 0.5
    pids = rng.integers(0, ids, n)

    def members(p: np.ndarray) -> np.ndarray:
        z = centres[torch.from_numpy(p)] + MEMBER_NOISE * torch.from_numpy(
            rng.standard_normal((len(p), LATENT), dtype=np.float32))
        x = z @ proj + ISO_NOISE * torch.from_numpy(rng.standard_normal((len(p), d), dtype=np.float32))
        return F.normalize(x, dim=1).numpy()

    gpath, qpath = workdir / f"gallery_{n}.f16.npy", workdir / f"queries_{n}.npy"
    g = np.lib.format.open_memmap(gpath, mode="w+", dtype=np.float16, shape=(n, d))
    for s in range(0, n, CHUNK):
        g[s:s + CHUNK] = members(pids[s:s + CHUNK]).astype(np.float16)
    g.flush()
    del g
    present = np.unique(pids)
    q_ids = rng.choice(present, num_queries, replace=num_queries > len(present))
    np.save(qpath, members(q_ids))       # held-out members: new draws of the gallery's identities
    return gpath, qpath


def ivf_overrides(args: argparse.Namespace) -> dict[str, int]:
    """The ivf-pq parameters given on the command line; the others are ``choose_params``' defaults
    for the size, as tools/build_index.py chooses them."""
    given = {"nlist": args.nlist, "m": args.m, "nprobe": args.nprobe, "refine": args.refine,
             "train_size": args.train_size}
    return {k: v for k, v in given.items() if v is not None}


def _load(paths: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    return np.load(paths["gallery"], mmap_mode="r"), np.load(paths["queries"])


def _single_times(fn: Any, queries: np.ndarray, count: int, budget_s: float) -> list[float]:
    """Seconds of ``fn(one query)`` for up to ``count`` queries within ``budget_s`` (after one warm-up)."""
    fn(queries[-1:])
    out: list[float] = []
    start = time.perf_counter()
    for i in range(min(count, len(queries))):
        t = time.perf_counter()
        fn(queries[i:i + 1])
        out.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(out) >= 5:
            break
    return out


def work_floor(paths: dict[str, str], opts: dict[str, Any]) -> dict[str, Any]:
    """The bare products (timed) and the exact top-10 of every query (saved for the recall)."""
    g, q = _load(paths)
    qt = F.normalize(torch.from_numpy(q), dim=1)
    ns = min(int(opts["single"]), len(qt), FLOOR_SINGLES)
    batch_s, single_s = 0.0, np.zeros(ns)
    best_v = torch.full((len(qt), 0), -math.inf)
    best_i = torch.zeros((len(qt), 0), dtype=torch.int64)
    for s in range(0, g.shape[0], CHUNK):
        gc = F.normalize(torch.from_numpy(np.asarray(g[s:s + CHUNK], dtype=np.float32)), dim=1)
        t = time.perf_counter()
        prod = qt @ gc.t()
        batch_s += time.perf_counter() - t
        for j in range(ns):
            t = time.perf_counter()
            qt[j:j + 1] @ gc.t()
            single_s[j] += time.perf_counter() - t
        v, i = torch.topk(prod, min(K, prod.shape[1]), dim=1)
        v, order = torch.topk(torch.cat([best_v, v], 1), min(K, best_v.shape[1] + v.shape[1]), dim=1)
        best_v, best_i = v, torch.cat([best_i, i + s], 1).gather(1, order)
    np.save(paths["exact"], best_i.numpy())
    return {"batch_s": batch_s, "single_s": single_s.tolist()}


def work_search(paths: dict[str, str], opts: dict[str, Any]) -> dict[str, Any]:
    """Today's brute force: the float32 gallery in memory, DistanceSpec.matrix + ranked_indices + top-k."""
    from config import get_default_config
    from utils.distance import DistanceSpec, ranked_indices

    g16, q = _load(paths)
    t = time.perf_counter()
    g = np.asarray(g16, dtype=np.float32)
    load_s = time.perf_counter() - t
    spec = DistanceSpec.from_cfg(get_default_config())

    def run(qs: np.ndarray) -> np.ndarray:
        return ranked_indices(spec.matrix(qs, g))[:, :K]
    single = _single_times(run, q, int(opts["single"]), float(opts["single_budget"]))
    t = time.perf_counter()
    ids = run(q)
    return {"load_s": load_s, "batch_s": time.perf_counter() - t, "single_s": single, "ids": ids.tolist()}


def _folder_bytes(folder: str) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _measure_index(gi: Any, q: np.ndarray, opts: dict[str, Any], sweep: bool) -> dict[str, Any]:
    from retrieval import index as gx

    single = _single_times(lambda qs: gx.search(gi, qs, K), q, int(opts["single"]), float(opts["single_budget"]))
    t = time.perf_counter()
    _, ids = gx.search(gi, q, K)
    out: dict[str, Any] = {"batch_s": time.perf_counter() - t, "single_s": single, "ids": ids.tolist()}
    if sweep and gi.kind == "ivf-pq":
        out["sweep"] = []
        nlist = int(gi.params["nlist"])
        for nprobe in sorted({p for p in (8, 16, 32, 64, 128, 256) if p <= nlist} | {int(gi.params["nprobe"])}):
            t = time.perf_counter()
            _, sids = gx.search(gi, q, K, nprobe=nprobe)
            sec = time.perf_counter() - t
            one = _single_times(lambda qs, p=nprobe: gx.search(gi, qs, K, nprobe=p), q, 20, 3.0)
            out["sweep"].append({"nprobe": nprobe, "batch_s": sec, "single_p50": float(np.median(one)),
                                 "ids": sids.tolist()})
    return out


def work_index(paths: dict[str, str], opts: dict[str, Any]) -> dict[str, Any]:
    """Build, write and search a gallery index of the kind and parameters in ``opts``."""
    from retrieval import index as gx
    from retrieval.index_store import save_index, write_index
    from utils.distance import DistanceSpec

    g, q = _load(paths)
    n, d = g.shape
    metric = DistanceSpec(True, "euclidean")
    folder = paths["index"]
    params = gx.choose_params(n, d, opts["kind"], **(opts.get("params") or {}))
    t = time.perf_counter()
    if opts["kind"] == "flat":                     # held in memory; written as it is (no second copy)
        gi = gx.build_index(g, metric, params)
        save_index(folder, gi)
    else:                                          # the float16 vectors go straight into the folder
        items = gx.Items(np.array([f"{i}.jpg" for i in range(n)]), np.zeros(n, np.int64), np.zeros(n, np.int64))
        gi = write_index(folder, g, metric, params, items, {})
    build_s = time.perf_counter() - t
    out = {"build_s": build_s, "disk_bytes": _folder_bytes(folder), "params": {k: v for k, v in params.items()
                                                                                if k not in ("add_batch",)}}
    out.update(_measure_index(gi, q, opts, sweep=bool(opts.get("sweep"))))
    return out


WORKERS = {"floor": work_floor, "search": work_search, "index": work_index}


# ----------------------------------------------------------------------------- parent
def _status(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / VmRSS of a process in bytes (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def spawn(name: str, paths: dict[str, str], opts: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its record with peak RSS (ru_maxrss) and peak anonymous memory."""
    out = workdir / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({"name": name, "paths": paths,
                                                                                  "opts": opts, "out": str(out)})]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SVLLREID_PROGRESS": "off"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # idle OpenMP threads sleep: the cores are shared
    proc = subprocess.Popen(cmd, env=env)
    peak_anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_anon = max(peak_anon, _status(proc.pid).get("RssAnon", 0))
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed with exit code {proc.returncode}")
    rec = json.loads(out.read_text())
    rec["peak_rss"] = usage.ru_maxrss * 1024
    rec["peak_anon"] = peak_anon
    return rec


def _ms(s: float) -> str:
    ms = 1e3 * s
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:,.0f}"


def _recall(ids: Any, exact: np.ndarray, k: int) -> float:
    from retrieval.index import recall_at_k
    return recall_at_k(np.asarray(ids), exact, k)


def _row(label: str, n: int, rec: dict[str, Any] | None, exact: np.ndarray, nq: int, note: str = "") -> list[str]:
    if rec is None:
        return [f"{n:,}", label] + ["-"] * 8 + [note]
    single = np.asarray(rec["single_s"])
    recall = (f"{_recall(rec['ids'], exact, 1):.3f} / {_recall(rec['ids'], exact, 10):.3f}" if "ids" in rec
              else "exact")
    build = f"{rec['build_s']:.1f}" if "build_s" in rec else (f"({rec['load_s']:.1f} load)" if "load_s" in rec
                                                             else "-")
    disk = f"{rec['disk_bytes'] / GB:.2f}" if "disk_bytes" in rec else "-"
    return [f"{n:,}", label, build, disk, _ms(float(np.median(single))), _ms(float(np.percentile(single, 99))),
            f"{rec['batch_s']:.2f} ({_ms(rec['batch_s'] / nq)})", recall,
            f"{rec['peak_anon'] / GB:.2f} / {rec['peak_rss'] / GB:.2f}", str(len(single)), note]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="gallery sizes")
    ap.add_argument("--queries", type=int, default=1000, help="queries (the batch; default 1000)")
    ap.add_argument("--dim", type=int, default=1280, help="feature width (default 1280)")
    ap.add_argument("--single", type=int, default=200, help="single queries timed per contender at most")
    ap.add_argument("--single-budget", type=float, default=10.0, help="seconds of single queries per contender")
    ap.add_argument("--nlist", type=int, help="ivf-pq lists (default ~ sqrt(n))")
    ap.add_argument("--m", type=int, help="ivf-pq sub-quantisers (default: d / 40, 32 at 1280)")
    ap.add_argument("--nprobe", type=int, help="ivf-pq lists scanned per query (default ~ nlist / 8, >= 16)")
    ap.add_argument("--refine", type=int, help="ivf-pq exact re-ranking factor (default 10)")
    ap.add_argument("--train-size", type=int, help="ivf-pq training vectors (default 64 x nlist)")
    ap.add_argument("--search-max-gb", type=float, default=None,
                    help="run today's brute force when it needs at most this (default: half the available memory)")
    ap.add_argument("--workdir", help="folder for the generated data and indexes (default: a temporary one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        rec = WORKERS[job["name"].split(":")[0]](job["paths"], job["opts"])
        Path(job["out"]).write_text(json.dumps(rec))
        return

    import faiss
    avail = _mem_available()
    search_cap = args.search_max_gb * GB if args.search_max_gb is not None else avail / 2
    print(f"torch {torch.__version__}, faiss {faiss.__version__}, {os.cpu_count()} CPUs, {avail / GB:.1f} GB "
          f"available, dim {args.dim}, {args.queries} queries, load average at start {os.getloadavg()[0]:.1f}")
    print(f"Galleries are generated in chunks into float16 .npy files and read from disk in chunks or "
          f"memory-mapped: the float32 gallery ({4 * max(args.sizes) * args.dim / GB:.1f} GB at "
          f"{max(args.sizes):,}) is never held whole in memory, except by flat and today's brute force.")
    rows, sweeps, goals = [], [], []
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_retrieval_", dir=args.workdir)
    with tmp:
        workdir = Path(tmp.name)
        for n in args.sizes:
            t = time.perf_counter()
            gpath, qpath = make_data(workdir, n, args.dim, args.queries)
            print(f"\n{n:,} x {args.dim}: generated in {time.perf_counter() - t:.1f} s "
                  f"({gpath.stat().st_size / GB:.2f} GB float16 on disk; float32 would be "
                  f"{4 * n * args.dim / GB:.2f} GB)", flush=True)
            paths = {"gallery": str(gpath), "queries": str(qpath), "exact": str(workdir / f"exact_{n}.npy")}
            opts = {"single": args.single, "single_budget": args.single_budget}
            floor = spawn("floor", paths, opts, workdir)
            exact = np.load(paths["exact"])
            rows.append(_row("floor: q @ g.T (exact top-10)", n, floor, exact, args.queries,
                             "products only, float32 chunks"))
            need = 4 * n * args.dim + 16 * n * args.queries
            if need <= search_cap:
                rec = spawn("search", paths, opts, workdir)
                rows.append(_row("search.py: full matrix + sort", n, rec, exact, args.queries))
            else:
                rows.append(_row("search.py: full matrix + sort", n, None, exact, args.queries,
                                 f"not run: needs ~{need / GB:.0f} GB (> {search_cap / GB:.0f} GB)"))
            print(f"  floor and exact top-10: done ({time.perf_counter() - t:.0f} s so far)", flush=True)
            configs = [("flat", "flat (exact)", {})]
            from retrieval.index import choose_params
            given = ivf_overrides(args)
            label = "ivf-pq + refine " + _params_label(choose_params(n, args.dim, "ivf-pq", **given))
            configs.append(("ivf-pq", label, given))
            for kind, label, params in configs:
                ipaths = {**paths, "index": str(workdir / f"index_{n}_{len(rows)}")}
                rec = spawn("index", ipaths, {**opts, "kind": kind, "params": params, "sweep": True}, workdir)
                shutil.rmtree(ipaths["index"], ignore_errors=True)
                rows.append(_row(label, n, rec, exact, args.queries))
                for s in rec.get("sweep", []):
                    sweeps.append([f"{n:,}", label, str(s["nprobe"]), f"{_recall(s['ids'], exact, 10):.3f}",
                                   _ms(s["single_p50"]), _ms(s["batch_s"] / args.queries)])
                if kind == "ivf-pq" and n == max(args.sizes):
                    goals.append((label, n, rec, _recall(rec["ids"], exact, 10), float(np.median(rec["single_s"]))))
                print(f"  {label}: done ({time.perf_counter() - t:.0f} s so far)", flush=True)
            for f in (gpath, qpath):
                f.unlink()

    head = ["gallery", "contender", "build + write (s)", "on disk (GB)", "single p50 (ms)", "single p99 (ms)",
            f"batch of {args.queries:,}: s (ms/query)", "recall@1 / @10", "peak anon / RSS (GB)", "singles", "note"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * 8 + ["---"]) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if sweeps:
        print("\nnprobe sweep (same index, same queries):\n")
        print("| gallery | index | nprobe | recall@10 | single p50 (ms) | batch ms/query |")
        print("|---|---|---:|---:|---:|---:|")
        for r in sweeps:
            print("| " + " | ".join(r) + " |")
    for label, n, rec, r10, p50 in goals:
        f32 = 4 * n * args.dim
        ok = r10 >= GOAL_RECALL10 and 1e3 * p50 <= GOAL_MS and rec["peak_anon"] < f32
        print(f"\nGoal at {n:,} (recall@10 >= {GOAL_RECALL10} at <= {GOAL_MS:.0f} ms per single query, peak memory "
              f"below the float32 gallery's {f32 / GB:.1f} GB), {label}: recall@10 {r10:.3f}, single p50 {_ms(p50)} "
              f"ms, peak anonymous memory {rec['peak_anon'] / GB:.2f} GB (RSS with the mapped index and gallery "
              f"files {rec['peak_rss'] / GB:.2f} GB): {'REACHED' if ok else 'NOT reached'} (memory judged on the "
              f"anonymous peak: mapped file pages are page cache the kernel reclaims)")
    print(f"\n(whole run {time.perf_counter() - t_all:.0f} s; peak anon = the process's own memory, sampled every "
          f"50 ms; RSS = ru_maxrss, which also counts the pages of memory-mapped files it touched, reclaimable "
          f"page cache; load average at the end {os.getloadavg()[0]:.1f})")


def _params_label(p: dict[str, Any]) -> str:
    return (f"(nlist {p['nlist']}, m {p['m']}, nprobe {p['nprobe']}, refine {p['refine']}, "
            f"train {p['train_size']:,})")


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


if __name__ == "__main__":
    main()
