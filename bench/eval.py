"""Bench: evaluation metrics and k-reciprocal re-ranking, ours vs the published loop code.

Synthetic clustered ReID features (identities = clusters in a 32-d latent space with
per-camera shifts, projected to ``--dim`` and L2-normalised; distractor gallery images
with their own random features). Contenders, each timed in its own subprocess so that
peak RSS (``ru_maxrss``) is per contender:

* ``metrics``: distances + CMC/mAP/mINP at Market-1501 scale.
  ours = ``utils.metrics.evaluate`` (blocked distances, vectorised ranks);
  reference = the published full torch distance matrix + numpy argsort + per-query loop
  (CLIP-ReID ``eval_func``, with mINP as in fast-reid, stable argsort).
* ``rerank``: k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) at Market-1501 scale.
  ours = ``utils.reranking.re_ranking``; reference = the published dense loop algorithm
  with V and the Jaccard distance in float32 (the published code uses float16 there).
* ``rerank-msmt``: ours only at MSMT17 scale (the dense reference needs > 24 GB).

The parent checks ours == reference (CMC/mAP/mINP, re-ranked distances max |diff|) and
prints a markdown table. ``--quick`` runs small sizes in a few seconds.

Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless set otherwise: on a machine whose cores
are shared with other jobs, spinning OpenMP threads slow every multi-threaded torch op down
several-fold (both contenders get the same setting).

    .venv/bin/python bench/eval.py            # full run (the reference re-ranking takes minutes)
    .venv/bin/python bench/eval.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKET = dict(num_query=3368, num_gallery=15913, ids=750, cams=6)
MSMT = dict(num_query=11659, num_gallery=82161, ids=3060, cams=15)
QUICK = dict(num_query=300, num_gallery=1500, ids=100, cams=6)
QUICK_MSMT = dict(num_query=600, num_gallery=4000, ids=300, cams=15)
GiB = 1 << 30


# ----------------------------------------------------------------------------- problem
def make_problem(num_query: int, num_gallery: int, ids: int, cams: int, dim: int, seed: int = 0,
                 noise: float = 0.6, distractor_frac: float = 0.18):
    """L2-normalised clustered features and labels (pid 0 = distractor, gallery only)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    latent = 32
    proj = torch.randn(latent, dim, generator=g) / latent ** 0.5
    centres = torch.randn(ids + 1, latent, generator=g)
    cam_shift = 0.3 * torch.randn(cams, latent, generator=g)
    q_pids = rng.integers(1, ids + 1, num_query)
    g_pids = np.where(rng.random(num_gallery) < distractor_frac, 0, rng.integers(1, ids + 1, num_gallery))
    q_cams, g_cams = rng.integers(0, cams, num_query), rng.integers(0, cams, num_gallery)

    def features(pids: np.ndarray, cams_: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(pids), dim)
        for s in range(0, len(pids), 8192):
            p, c = torch.from_numpy(pids[s:s + 8192]), torch.from_numpy(cams_[s:s + 8192])
            z = centres[p] + cam_shift[c] + noise * torch.randn(len(p), latent, generator=g)
            z[p == 0] = (1 + noise) * torch.randn(int((p == 0).sum()), latent, generator=g)
            x = z @ proj + 0.3 * torch.randn(len(p), dim, generator=g)
            out[s:s + 8192] = torch.nn.functional.normalize(x, dim=1)
        return out

    return features(q_pids, q_cams), features(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


# ----------------------------------------------------------------------------- references
# ----------------------------------------------------------------------------- worker
def run_worker(task: str, contender: str, sizes: dict, dim: int, workdir: Path) -> dict:
    """Generate the problem, time one contender, save its result; returns the JSON record."""
    from tests.reference import exact_eval_func as ref_eval_func, exact_re_ranking as ref_re_ranking
    from tests.reference import published_euclidean_distance as ref_euclidean_distance
    from utils.metrics import eval_func, evaluate
    from utils.reranking import re_ranking

    qf, gf, qp, gp, qc, gc = make_problem(**sizes, dim=dim)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec: dict = {"task": task, "contender": contender}
    t0 = time.perf_counter()
    if task == "metrics":
        if contender == "ours":
            cmc, m_ap, m_inp = evaluate(qf, gf, qp, gp, qc, gc, max_rank=50)
        else:
            cmc, m_ap, m_inp = ref_eval_func(ref_euclidean_distance(qf, gf), qp, gp, qc, gc, max_rank=50)
        rec["seconds"] = time.perf_counter() - t0
        rec.update(cmc=[float(x) for x in cmc], mAP=m_ap, mINP=m_inp)
    else:
        dist = re_ranking(qf, gf, 20, 6, 0.3) if contender == "ours" else ref_re_ranking(qf, gf, 20, 6, 0.3)
        rec["seconds"] = time.perf_counter() - t0
        dist = dist.numpy() if isinstance(dist, torch.Tensor) else dist
        if task == "rerank":
            np.save(workdir / f"rerank_{contender}.npy", dist)
    rec["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec["rss_after_data"] = rss_data
    if task != "metrics":  # sanity of the output, after the peak was recorded
        _, m_ap, _ = eval_func(dist, qp, gp, qc, gc)
        rec["mAP_reranked"] = m_ap
    return rec


def spawn(task: str, contender: str, sizes: dict, dim: int, workdir: Path) -> dict:
    """Run one contender in a fresh interpreter and read back its record."""
    out = workdir / f"{task}_{contender}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, contender,
           "--sizes", json.dumps(sizes), "--dim", str(dim), "--workdir", str(workdir)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # Same for every contender: idle OpenMP threads sleep instead of spinning, which on a
    # shared 2-core machine otherwise starves the working thread (see the module doc).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- report
def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--dim", type=int, default=None, help="feature width (default 1280; 256 with --quick)")
    ap.add_argument("--num-query", type=int, help="Market-scale problem: number of queries")
    ap.add_argument("--num-gallery", type=int, help="Market-scale problem: gallery size")
    ap.add_argument("--msmt-num-query", type=int, help="MSMT-scale problem: number of queries")
    ap.add_argument("--msmt-num-gallery", type=int, help="MSMT-scale problem: gallery size")
    ap.add_argument("--skip", nargs="*", default=[], choices=["metrics", "rerank", "rerank-msmt"],
                    help="tasks to skip")
    ap.add_argument("--worker", nargs=2, metavar=("TASK", "CONTENDER"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dim = args.dim or (256 if args.quick else 1280)

    if args.worker:
        workdir = Path(args.workdir)
        rec = run_worker(*args.worker, json.loads(args.sizes), dim, workdir)
        (workdir / f"{args.worker[0]}_{args.worker[1]}.json").write_text(json.dumps(rec))
        return

    market = dict(QUICK if args.quick else MARKET)
    msmt = dict(QUICK_MSMT if args.quick else MSMT)
    for d, q, g in ((market, args.num_query, args.num_gallery), (msmt, args.msmt_num_query, args.msmt_num_gallery)):
        d.update({k: v for k, v in (("num_query", q), ("num_gallery", g)) if v})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dim {dim}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        workdir = Path(tmp)
        if "metrics" not in args.skip:
            ours, ref = spawn("metrics", "ours", market, dim, workdir), spawn("metrics", "ref", market, dim, workdir)
            np.testing.assert_allclose(ours["cmc"], ref["cmc"], rtol=0, atol=1e-6)
            assert abs(ours["mAP"] - ref["mAP"]) <= 1e-9 and abs(ours["mINP"] - ref["mINP"]) <= 1e-9, (ours, ref)
            print(f"metrics: ours == reference (R1 {ours['cmc'][0]:.4f}, mAP {ours['mAP']:.6f}, "
                  f"mINP {ours['mINP']:.6f})")
            rows.append(("distances + CMC/mAP/mINP", market, ours, ref))
        if "rerank" not in args.skip:
            ours, ref = spawn("rerank", "ours", market, dim, workdir), spawn("rerank", "ref", market, dim, workdir)
            a, b = np.load(workdir / "rerank_ours.npy"), np.load(workdir / "rerank_ref.npy")
            diff = float(np.abs(a - b).max())
            same_rank = float(np.mean(np.all(np.argsort(a, 1, kind="stable") == np.argsort(b, 1, kind="stable"), 1)))
            del a, b
            assert diff <= 1e-5, f"re-ranking differs from the reference: max |diff| = {diff}"
            assert abs(ours["mAP_reranked"] - ref["mAP_reranked"]) <= 1e-6
            print(f"re-ranking: max |ours - reference| = {diff:.2e}, identical full rankings for "
                  f"{100 * same_rank:.2f}% of queries, mAP after re-ranking {ours['mAP_reranked']:.6f}")
            rows.append(("re-ranking (k1=20, k2=6)", market, ours, ref))
        if "rerank-msmt" not in args.skip:
            ours = spawn("rerank-msmt", "ours", msmt, dim, workdir)
            print(f"MSMT-scale re-ranking: mAP after re-ranking {ours['mAP_reranked']:.6f}")
            rows.append(("re-ranking (k1=20, k2=6)", msmt, ours, None))

    print("\n| task | query x gallery | ours (s) | reference (s) | speed-up | ours peak RSS (GiB) "
          "| reference peak RSS (GiB) | RSS ours/ref |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, size, ours, ref in rows:
        shape = f"{size['num_query']:,} x {size['num_gallery']:,}"
        if ref is None:
            print(f"| {name} | {shape} | {ours['seconds']:.1f} | - | - | {_gib(ours['peak_rss'])} | - | - |")
        else:
            print(f"| {name} | {shape} | {ours['seconds']:.2f} | {ref['seconds']:.2f} | "
                  f"{ref['seconds'] / ours['seconds']:.1f}x | {_gib(ours['peak_rss'])} | {_gib(ref['peak_rss'])} | "
                  f"{ours['peak_rss'] / ref['peak_rss']:.2f} |")
    print(f"\n(peak RSS is per process and includes the generated features; after data generation "
          f"the processes were at {', '.join(_gib(r[2]['rss_after_data']) for r in rows)} GiB for ours)")


if __name__ == "__main__":
    main()
