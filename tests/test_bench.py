"""The benchmarks: every one is run by ``make bench``, and the retrieval bench runs at a small size
and prints its table, with exact contenders at recall 1."""
import glob
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def test_make_bench_runs_every_benchmark():
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = f.read()
    target = re.search(r"^bench:.*\n((?:\t.*\n)+)", make, re.M)
    assert target is not None
    run = set(re.findall(r"bench/(\w+\.py)", target.group(1)))
    benches = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))}
    assert run == {b for b in benches if not b.startswith("_")}     # _name.py: a helper of the benches


@pytest.mark.slow
def test_retrieval_bench_small_size_prints_its_table():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gallery_index.py"), "--sizes", "3000", "--queries", "40",
           "--single", "5", "--single-budget", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| 3,000 |") and len(cells) == 11:
            rows[cells[1].split(" (")[0]] = cells
    assert set(rows) == {"floor: q @ g.T", "search.py: full matrix + sort", "flat", "ivf-pq + refine"}, rows
    # the exact contenders find the exact top-10 (computed independently, by the floor's products)
    assert rows["flat"][7] == "1.000 / 1.000" and rows["search.py: full matrix + sort"][7] == "1.000 / 1.000"
    for name in ("flat", "ivf-pq + refine"):
        assert float(rows[name][3]) > 0 and float(rows[name][4]) > 0      # index size on disk, latency
    r1, r10 = (float(x) for x in rows["ivf-pq + refine"][7].split(" / "))
    assert 0 < r1 <= 1 and 0 < r10 <= 1
    assert "nprobe sweep" in proc.stdout and "Goal at 3,000" in proc.stdout


@pytest.mark.slow
def test_loader_bench_prints_both_tables(tiny_root):
    """bench/loader.py on the tiny set: the before/after rows of both pipelines and the resize rows,
    every figure positive."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "loader.py"), "--root", tiny_root, "--images", "32",
           "--batch", "8", "--repeats", "1", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    loader_part, _, resize_part = proc.stdout.partition("The resize alone")

    def table(text):
        lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
        return {cells[0]: cells for cells in rows}
    loaders, resizes = table(loader_part), table(resize_part)
    assert {"test", "stage2"} <= set(loaders) and {"test", "train"} <= set(resizes), proc.stdout
    for name in ("test", "stage2"):
        assert float(loaders[name][2]) > 0 and float(loaders[name][3]) > 0 and float(loaders[name][5].rstrip("x")) > 0
    assert resizes["test"][1] == "bilinear" and resizes["train"][1] == "bicubic"
    assert all(float(resizes[n][c].rstrip("x")) > 0 for n in ("test", "train") for c in (3, 4, 5, 6))
