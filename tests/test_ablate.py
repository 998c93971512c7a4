"""tools/ablate.py: a grid x seeds of real (tiny) trainings, a killed ablation resumed without
repeating finished runs, a report checked against the runs' own results.json, and bad input."""
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import psutil
import pytest
import scipy.stats

from tests.helpers import DEMO, TINY, one_line_error
from tools import ablate
from utils.stats import summarize, welch_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 1 + 1 epochs, evaluation at the end, no pictures, the report only.
QUICK = [*TINY, "SOLVER.STAGE2.MAX_EPOCHS", "1", "SOLVER.STAGE2.EVAL_PERIOD", "1",
         "SOLVER.STAGE2.CHECKPOINT_PERIOD", "1", "SOLVER.STAGE2.STEPS", "[1, 2]"]


def ablate_cmd(root, out, *extra):
    return [sys.executable, os.path.join(ROOT, "tools", "ablate.py"), "--config_file", DEMO,
            "--grid", "MODEL.USE_SSL=True,False", "--seeds", "2", "--out", str(out),
            "DATASETS.ROOT_DIR", str(root), *QUICK, *extra]


def _results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_grid_resumes_after_a_kill_and_reports_what_the_runs_hold(tiny_root, tmp_path):
    out = tmp_path / "abl"
    env = dict(os.environ, SVLLREID_PROGRESS="off")
    # first attempt: killed (the whole process group, as a closed terminal would) after the first run finished
    proc = subprocess.Popen(ablate_cmd(tiny_root, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, text=True)
    first = out / "USE_SSL=True" / "seed_1234"
    deadline = time.time() + 600

    def first_recorded():
        try:
            return "USE_SSL=True/seed_1234" in json.loads((out / "status.json").read_text())
        except (OSError, ValueError):
            return False
    while not first_recorded():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)                      # the second run gets going
    trainings = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the training in flight gets a Ctrl-C when the tool dies (it runs in a session of its own):
    # it stops by itself and frees its folder
    gone, alive = psutil.wait_procs(trainings, timeout=300)
    assert not alive, alive
    kept = (first / "results.json").read_bytes(), (first / "results.json").stat().st_mtime_ns

    # the same command again: the finished run is skipped, the rest run, the report is written
    done = subprocess.run(ablate_cmd(tiny_root, out), capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 runs" in done.stdout and "1 finished" in done.stdout, done.stdout
    assert "start  USE_SSL=True/seed_1234" not in done.stdout
    assert ((first / "results.json").read_bytes(), (first / "results.json").stat().st_mtime_ns) == kept
    status = json.loads((out / "status.json").read_text())
    assert status["USE_SSL=True/seed_1234"]["attempts"] == 1
    assert all(v["state"] == "done" for v in status.values()) and len(status) == 4

    # the table, recomputed from the runs' own results.json
    with open(out / "results.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"USE_SSL=True", "USE_SSL=False"} and rows["USE_SSL=True"]["baseline"] == "True"
    per = {v: [_results(out / v / f"seed_{s}") for s in (1234, 1235)] for v in rows}
    for v, res in per.items():
        maps = [r["mAP"] for r in res]
        r1s = [r["cmc"][0] for r in res]
        assert int(rows[v]["n"]) == 2
        assert float(rows[v]["mAP_mean"]) == pytest.approx(statistics.mean(maps), abs=1e-12)
        assert float(rows[v]["mAP_std"]) == pytest.approx(statistics.stdev(maps), abs=1e-12)
        assert float(rows[v]["R1_mean"]) == pytest.approx(statistics.mean(r1s), abs=1e-12)
    diff = float(rows["USE_SSL=False"]["mAP_diff"])
    assert diff == pytest.approx(statistics.mean(r["mAP"] for r in per["USE_SSL=False"])
                                 - statistics.mean(r["mAP"] for r in per["USE_SSL=True"]), abs=1e-12)
    md = (out / "results.md").read_text()
    assert "USE_SSL=False" in md and "(baseline)" in md and (out / "results.png").stat().st_size > 10_000

    # --report rebuilds the same table from the folders alone
    os.remove(out / "results.md")
    rep = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ablate.py"), "--report", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and (out / "results.md").read_text() == md


def test_a_failed_run_is_shown_not_dropped(tmp_path):
    plan = {"config_file": DEMO, "opts": [], "variants": {"a": {}, "b": {"MODEL.USE_SSL": "False"}},
            "baseline": "a", "seeds": [1, 2]}
    out = tmp_path / "abl"
    ablate.claim_out(str(out), plan)
    for v, s, m in (("a", 1, 0.5), ("a", 2, 0.7), ("b", 1, 0.6)):
        folder = out / v / f"seed_{s}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"mAP": m, "cmc": [m + 0.1] * 5, "mINP": m / 2}))
    (out / "status.json").write_text(json.dumps({"b/seed_2": {"state": "failed", "message": "error: diverged",
                                                               "seconds": 3.0, "attempts": 1}}))
    rows = {r["variant"]: r for r in ablate.build_report(str(out))}
    assert rows["b"]["n"] == 1 and rows["b"]["failed"] == ["seed 2: error: diverged"]
    assert math.isnan(rows["b"]["mAP_std"]) and math.isnan(rows["b"]["mAP_lo"])   # one value: no spread
    assert rows["a"]["mAP_mean"] == pytest.approx(0.6)
    assert rows["a"]["mAP_std"] == pytest.approx(statistics.stdev([.5, .7]))
    ablate.write_report(str(out))
    assert "1 FAILED (seed 2: error: diverged)" in (out / "results.md").read_text()


def test_welch_interval_matches_scipy():
    a, b = [0.51, 0.55, 0.49, 0.58], [0.47, 0.50, 0.44]
    diff, lo, hi = welch_interval(a, b)
    ci = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-9)
    s = summarize(a)
    assert (s.n, s.mean, s.std) == (4, pytest.approx(statistics.mean(a)), pytest.approx(statistics.stdev(a)))
    assert all(math.isnan(x) for x in welch_interval([0.5], b)[1:])


@pytest.mark.parametrize("args, names", [
    (["--grid", "MODEL.NO_SUCH_KEY=1,2"], ["MODEL.NO_SUCH_KEY"]),
    (["--grid", "SOLVER.STAGE1.MAX_EPOCHS=2,abc"], ["SOLVER.STAGE1.MAX_EPOCHS", "abc"]),
    (["--grid", "MODEL.SSL_TYPE=SIMCLR,BYOL"], ["MODEL.SSL_TYPE", "BYOL"]),
    ([], ["grid is empty"]),
    (["--grid", "MODEL.USE_SSL="], ["MODEL.USE_SSL"]),
    (["--grid", "MODEL.USE_SSL=True,False", "--seeds", "0"], ["--seeds"]),
    (["--grid", "SOLVER.SEED=1,2"], ["SOLVER.SEED"]),
])
def test_bad_grids_fail_in_one_line_before_any_run(tmp_path, capsys, args, names):
    out = tmp_path / "abl"
    assert ablate.main(["--config_file", DEMO, *args, "--out", str(out)]) == 2
    one_line_error(capsys, *names)
    assert not out.exists()


def test_grid_file_errors_and_another_grid_in_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty.yml"
    empty.write_text("variants: {}\n")
    assert ablate.main(["--config_file", DEMO, "--grid_file", str(empty), "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "grid is empty")
    bad = tmp_path / "bad.yml"
    bad.write_text("variants:\n  a: {MODEL.SSL_TYPE: BYOL}\n")
    assert ablate.main(["--config_file", DEMO, "--grid_file", str(bad), "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "variant 'a'", "MODEL.SSL_TYPE")

    out = tmp_path / "abl"
    args = ablate.parse_args(["--config_file", DEMO, "--grid", "MODEL.USE_SSL=True,False", "--out", str(out)])
    ablate.claim_out(str(out), ablate.make_plan(args))
    assert ablate.main(["--config_file", DEMO, "--grid", "MODEL.USE_SSL=True,False", "--seeds", "3",
                        "--out", str(out)]) == 2
    one_line_error(capsys, str(out), "another grid", "seeds")

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    assert ablate.main(["--config_file", DEMO, "--grid", "MODEL.USE_SSL=True,False", "--out", str(run)]) == 2
    one_line_error(capsys, str(run), "training run")


def test_the_paper_grid_file_loads_on_every_dataset_config():
    variants, baseline = ablate.grid_from_file(os.path.join(ROOT, "configs", "ablations", "svllreid.yml"))
    assert baseline == "clipreid" and len(variants) == 7
    for cfg in ("configs/person/vit_svllreid.yml", "configs/veri/vit_svllreid.yml", DEMO):
        args = ablate.parse_args(["--config_file", os.path.join(ROOT, cfg), "--grid_file",
                                  os.path.join(ROOT, "configs", "ablations", "svllreid.yml"), "--out", "unused"])
        plan = ablate.make_plan(args)
        assert plan["baseline"] == "clipreid" and set(plan["variants"]) == set(variants)
    assert ablate.differing_keys(variants) == ["MODEL.SSL_TYPE", "MODEL.USE_SSL", "MODEL.USE_SSL_STAGE1",
                                               "SOLVER.STAGE1.PROMPT_AUG_METHOD"]


@pytest.mark.slow
def test_a_grid_whose_first_run_fails_stops_and_exits_2(tmp_path, capsys):
    out = tmp_path / "abl"
    rc = ablate.main(["--config_file", DEMO, "--grid", "MODEL.USE_SSL=True,False", "--out", str(out),
                      "DATASETS.ROOT_DIR", str(tmp_path / "no_data"), *QUICK])
    assert rc == 2
    captured = capsys.readouterr()
    assert "not starting the other 1 run(s)" in captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "1 run(s) failed and 1 did not run" in err, err
    status = json.loads((out / "status.json").read_text())
    assert list(status) == ["USE_SSL=True/seed_1234"] and status["USE_SSL=True/seed_1234"]["state"] == "failed"
    assert "no_data" in status["USE_SSL=True/seed_1234"]["message"]     # the training's own one-line error
    assert "1 FAILED" in (out / "results.md").read_text()
