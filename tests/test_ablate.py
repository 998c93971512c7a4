"""tools/ablate.py: a grid x seeds of real (tiny) trainings, a killed ablation resumed without
repeating finished runs, a report checked against the runs' own results.json, and bad input."""
import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import psutil
import pytest
import scipy.stats

from config import ConfigError, load_config
from datasets.bases import dataset_change
from tests.helpers import DEMO, TINY, one_line_error, synthetic_set
from tools import ablate
from utils.run_dir import RunError
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
            status = json.loads((out / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return status.get("USE_SSL=True/seed_1234", {}).get("state") == "done"
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
    # the same key in two --grid flags would collapse into variants that run one value only
    (["--grid", "MODEL.USE_SSL=True", "--grid", "MODEL.USE_SSL=False"], ["MODEL.USE_SSL", "two --grid"]),
    # a grid key given as a plain override too: the variant's value would silently replace it
    (["--grid", "MODEL.USE_SSL=True,False", "MODEL.USE_SSL", "False"], ["MODEL.USE_SSL", "override"]),
    (["--grid", "MODEL.USE_SSL=True,False", "--seeds", "100000"], ["--seeds 100000", "100"]),
    (["--grid", "MODEL.USE_SSL=True,False", "--devices", "banana"], ["--devices banana", "MODEL.DEVICE"]),
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


def test_variant_folders_stay_inside_out(tmp_path):
    grid = tmp_path / "g.yml"
    grid.write_text("variants:\n  '..': {MODEL.USE_SSL: False}\n  ./x: {}\n  .hidden: {MODEL.SSL_TYPE: SIMSIAM}\n")
    plan = ablate.make_plan(ablate.parse_args(["--config_file", DEMO, "--grid_file", str(grid), "--out", "o"]))
    out = str(tmp_path / "abl")
    for run in ablate.runs_of(plan, out):
        rel = os.path.relpath(run.folder, out).split(os.sep)
        assert len(rel) == 2 and not rel[0].startswith("."), run.folder


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
def test_a_grid_whose_first_run_fails_stops_and_exits_2(tiny_root, tmp_path, capsys):
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

    # the same command with the data path corrected: taken, said, and every run (the failed one too) runs
    rc = ablate.main(["--config_file", DEMO, "--grid", "MODEL.USE_SSL=True,False", "--out", str(out),
                      "DATASETS.ROOT_DIR", tiny_root, *QUICK])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "changed where or how the runs run" in printed and "DATASETS.ROOT_DIR" in printed
    status = json.loads((out / "status.json").read_text())
    assert [v["state"] for v in status.values()] == ["done", "done"]
    assert status["USE_SSL=True/seed_1234"]["ran"]["data"]["name"] == "folder"


@pytest.mark.slow
def test_relative_paths_mean_the_users_folder_and_regenerated_data_restarts_a_run(tmp_path, monkeypatch, capsys):
    """From another folder, with relative --out and data paths, the first seed as an override and a
    list override in words; then the run, killed before its end, finds other data at the same path."""
    work = tmp_path / "work"
    synthetic_set(work / "data")
    monkeypatch.chdir(work)
    argv = ["--config_file", os.path.relpath(DEMO), "--grid", "MODEL.USE_SSL=False", "--out", "abl",
            "DATASETS.ROOT_DIR", "data", *QUICK[:-2], "SOLVER.STAGE2.STEPS", "[1,", "2]", "SOLVER.SEED", "7"]
    assert ablate.main(argv) == 0, capsys.readouterr()
    run = work / "abl" / "USE_SSL=False" / "seed_7"
    first = _results(run)
    assert load_config(str(run / "config.yaml")).SOLVER.SEED == 7
    assert not os.path.exists(os.path.join(ROOT, "abl")) and not os.path.exists(os.path.join(ROOT, "data"))
    # as after a kill before the run's end: its last.pth, no results.json; then the data is regenerated
    os.remove(run / "results.json")
    shutil.rmtree(work / "data")
    synthetic_set(work / "data", seed=4)
    capsys.readouterr()
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "restart USE_SSL=False/seed_7 from scratch: its data changed since it began" in printed, printed
    assert "(resume)" not in printed
    assert [n for n in os.listdir(run) if n.startswith("previous-")]          # the old files are kept aside
    assert _results(run) != first


# ----------------------------------------------------------------------------- what the grid runs
def _plan(*args):
    return ablate.make_plan(ablate.parse_args(["--config_file", DEMO, *args]))


def _claimed(out, *args):
    plan, _ = ablate.claim_out(str(out), _plan(*args))
    return plan


def _write_run(out, plan, variant, seed, mAP, config=None):
    """A finished run in the grid's folder: results.json, and config.yaml (the variant's own unless given)."""
    run = next(r for r in ablate.runs_of(plan, str(out)) if r.variant == variant and r.seed == seed)
    os.makedirs(run.folder, exist_ok=True)
    with open(os.path.join(run.folder, "results.json"), "w") as f:
        json.dump({"mAP": mAP, "cmc": [mAP] * 5, "mINP": mAP / 2}, f)
    if config is None:
        config = load_config(ablate.grid_config(str(out), plan), [*ablate.run_overrides(plan, run),
                                                                  "OUTPUT_DIR", run.folder]).dump()
    with open(os.path.join(run.folder, "config.yaml"), "w") as f:
        f.write(config)
    return run


def test_a_list_override_pastes_as_documented():
    """`SOLVER.STAGE2.STEPS [12, 17]` reaches the program as three words; so does a --grid of lists."""
    args = ablate.parse_args(["--config_file", DEMO, "--grid", "SOLVER.STAGE2.STEPS=[12,", "17],[20,", "25]",
                              "--out", "x", "SOLVER.STAGE2.MAX_EPOCHS", "30", "INPUT.SIZE_TRAIN", "[64,", "32]",
                              "--seeds", "2"])
    assert args.opts == ["SOLVER.STAGE2.MAX_EPOCHS", "30", "INPUT.SIZE_TRAIN", "[64, 32]"]
    assert args.grid == ["SOLVER.STAGE2.STEPS=[12, 17],[20, 25]"] and args.seeds == 2
    plan = ablate.make_plan(args)
    assert list(plan["variants"]) == ["STEPS=[12, 17]", "STEPS=[20, 25]"]
    assert load_config(DEMO, args.opts).INPUT.SIZE_TRAIN == [64, 32]


def test_the_first_seed_may_be_an_override():
    assert _plan("--grid", "MODEL.USE_SSL=True,False", "--seeds", "3", "SOLVER.SEED", "7")["seeds"] == [7, 8, 9]


def test_devices_are_checked_before_any_run(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(ablate, "cuda_problem", lambda: "no NVIDIA driver was found")     # this machine, or one like it
    out = tmp_path / "abl"
    assert ablate.main(["--config_file", DEMO, "--grid", "MODEL.USE_SSL=True,False", "--devices", "cuda:0,cuda:1",
                        "--out", str(out)]) == 2
    one_line_error(capsys, "--devices cuda:0,cuda:1", "CUDA cannot be used", "no NVIDIA driver")
    assert not out.exists()
    # two GPUs: each slot sees its own one, whatever MODEL.DEVICE_ID says; a third does not exist
    monkeypatch.setattr(ablate, "cuda_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert ablate.check_devices(["cuda:0", "cuda:1", "cpu"], DEMO, []) == [
        ("cuda:0", {"CUDA_VISIBLE_DEVICES": "0"}), ("cuda:0", {"CUDA_VISIBLE_DEVICES": "1"}), ("cpu", {})]
    with pytest.raises(ConfigError, match="cuda:2 does not exist"):
        ablate.check_devices(["cuda:2"], DEMO, [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert ablate.check_devices(["cuda:1"], DEMO, []) == [("cuda:0", {"CUDA_VISIBLE_DEVICES": "7"})]


def test_damaged_plans_and_nested_grid_files_are_one_line(tmp_path, capsys):
    nested = tmp_path / "nested.yml"
    nested.write_text("variants:\n  a: {MODEL: {USE_SSL: False}}\n  b: {}\n")
    assert ablate.main(["--config_file", DEMO, "--grid_file", str(nested), "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, str(nested), "'a'", "MODEL", "MODEL.KEY")
    for content, names in (("[]", ["found a list"]), ("null", ["found null"]),
                           ('{"variants": {"a": {}}}', ["no config_file"]),
                           ('{"config_file": "", "opts": [], "variants": {"a": {}}, "baseline": "a", "seeds": "x"}',
                            ["seeds"])):
        out = tmp_path / f"abl{len(content)}"
        out.mkdir()
        (out / "ablation.json").write_text(content)
        assert ablate.main(["--report", str(out)]) == 2
        one_line_error(capsys, out / "ablation.json", "not an ablation plan", *names)
    # a status.json that is not the tool's, a file as --out or --report, a missing grid file
    out = tmp_path / "abl"
    ablate.claim_out(str(out), _plan("--grid", "MODEL.USE_SSL=True,False", "--out", str(out)))
    (out / "status.json").write_text("[1]")
    assert ablate.main(["--report", str(out)]) == 2
    one_line_error(capsys, out / "status.json", "not this tool's record")
    assert ablate.main(["--report", str(out / "status.json")]) == 2
    one_line_error(capsys, out / "status.json", "is a file")
    assert ablate.main(["--config_file", DEMO, "--grid", "MODEL.USE_SSL=True,False", "--out",
                        str(out / "status.json")]) == 2
    one_line_error(capsys, "--out", "is a file")
    assert ablate.main(["--config_file", DEMO, "--grid_file", str(tmp_path / "none.yml"), "--out", "x"]) == 2
    one_line_error(capsys, "none.yml", "not found")
    binary = tmp_path / "binary.yml"          # was a UnicodeDecodeError traceback
    binary.write_bytes(bytes(range(128, 256)))
    assert ablate.main(["--config_file", DEMO, "--grid_file", str(binary), "--out", str(tmp_path / "y")]) == 2
    one_line_error(capsys, binary, "not a text (YAML) file")


def test_the_baseline_and_the_order_of_values_do_not_make_another_grid(tmp_path, capsys):
    out = tmp_path / "abl"
    first = _claimed(out, "--grid", "MODEL.USE_SSL=True,False", "--grid", "MODEL.SSL_TYPE=SIMCLR,SIMSIAM",
                     "--out", str(out))
    capsys.readouterr()
    # the values and the flags listed in another order: the same variants, under their first names
    plan, changed = ablate.claim_out(str(out), _plan("--grid", "MODEL.SSL_TYPE=SIMSIAM,SIMCLR", "--grid",
                                                     "MODEL.USE_SSL=False,True", "--out", str(out)))
    assert not changed and set(plan["variants"]) == set(first["variants"])
    assert plan["baseline"] == "USE_SSL=False+SSL_TYPE=SIMSIAM"      # the new first variant, under its old name
    assert "baseline USE_SSL=False+SSL_TYPE=SIMSIAM (was USE_SSL=True+SSL_TYPE=SIMCLR)" in capsys.readouterr().out
    plan, _ = ablate.claim_out(str(out), _plan("--grid", "MODEL.USE_SSL=True,False", "--grid",
                                               "MODEL.SSL_TYPE=SIMCLR,SIMSIAM", "--baseline",
                                               "USE_SSL=False+SSL_TYPE=SIMCLR", "--out", str(out)))
    assert json.loads((out / "ablation.json").read_text())["baseline"] == "USE_SSL=False+SSL_TYPE=SIMCLR"

    # --report takes --baseline (the plan keeps its own)
    for v, m in (("USE_SSL=True+SSL_TYPE=SIMCLR", 0.5), ("USE_SSL=False+SSL_TYPE=SIMCLR", 0.6)):
        _write_run(out, plan, v, 1234, m)
    assert ablate.main(["--report", str(out), "--baseline", "USE_SSL=True+SSL_TYPE=SIMCLR"]) == 0
    with open(out / "results.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert rows["USE_SSL=True+SSL_TYPE=SIMCLR"]["baseline"] == "True"
    assert float(rows["USE_SSL=False+SSL_TYPE=SIMCLR"]["mAP_diff"]) == pytest.approx(0.1)
    capsys.readouterr()
    assert ablate.main(["--report", str(out), "--baseline", "nope"]) == 2
    one_line_error(capsys, "--baseline 'nope'", "not a variant")

    # two variants of the same overrides (an A/A check) stay two on a re-run
    same = tmp_path / "aa.yml"
    same.write_text("variants:\n  a: {}\n  b: {}\n")
    args = ["--config_file", DEMO, "--grid_file", str(same), "--out", str(tmp_path / "aa")]
    ablate.claim_out(str(tmp_path / "aa"), ablate.make_plan(ablate.parse_args(args)))
    plan, _ = ablate.claim_out(str(tmp_path / "aa"), ablate.make_plan(ablate.parse_args(args)))
    assert list(plan["variants"]) == ["a", "b"]


def test_changed_settings_apply_while_no_run_has_finished(tmp_path, capsys):
    out = tmp_path / "abl"
    grid = ("--grid", "MODEL.USE_SSL=True,False", "--seeds", "2", "--out", str(out))
    plan = _claimed(out, *grid, "DATASETS.ROOT_DIR", str(tmp_path / "wrong"))
    (out / "status.json").write_text(json.dumps({"USE_SSL=True/seed_1234": {"state": "failed", "message": "x"}}))
    capsys.readouterr()
    # the corrected data folder: accepted, said, and the failed run is tried again
    plan, changed = ablate.claim_out(str(out), _plan(*grid, "DATASETS.ROOT_DIR", str(tmp_path / "data")))
    assert changed and "DATASETS.ROOT_DIR" in capsys.readouterr().out
    assert load_config(ablate.grid_config(str(out), plan)).DATASETS.ROOT_DIR == str(tmp_path / "data")
    # a setting that changes what runs compute: accepted while none has finished ...
    ablate.claim_out(str(out), _plan(*grid, "DATASETS.ROOT_DIR", str(tmp_path / "data"), "INPUT.RE_PROB", "0.0"))
    assert "INPUT.RE_PROB 0.5 -> 0.0" in capsys.readouterr().out
    # ... refused once one has
    _write_run(out, json.loads((out / "ablation.json").read_text()), "USE_SSL=True", 1234, 0.5)
    with pytest.raises(RunError, match="another grid.*INPUT.RE_PROB.*USE_SSL=True/seed_1234"):
        ablate.claim_out(str(out), _plan(*grid, "DATASETS.ROOT_DIR", str(tmp_path / "data")))
    # where and how runs run may still change
    _, changed = ablate.claim_out(str(out), _plan(*grid, "DATASETS.ROOT_DIR", str(tmp_path / "moved"),
                                                  "INPUT.RE_PROB", "0.0"))
    assert changed and "where or how the runs run" in capsys.readouterr().out


def test_an_edited_config_file_changes_no_run_of_the_grid(tmp_path, capsys):
    cfg = tmp_path / "my.yml"
    cfg.write_text(open(DEMO).read())
    out = tmp_path / "abl"
    plan, _ = ablate.claim_out(str(out), ablate.make_plan(ablate.parse_args(
        ["--config_file", str(cfg), "--grid", "MODEL.USE_SSL=True,False", "--out", str(out)])))
    assert plan["config_sha256"] and plan["config_file"] == str(cfg)
    cfg.write_text(open(DEMO).read() + "\nINPUT:\n  RE_PROB: 0.0\n")     # edited while the grid runs
    assert load_config(str(cfg)).INPUT.RE_PROB == 0.0
    for run in ablate.runs_of(plan, str(out)):
        cmd = ablate.command(plan, str(out), run, "new", None)
        args = __import__("train_svllreid").parse_args(cmd[2:])
        assert load_config(args.config_file, args.opts).INPUT.RE_PROB == 0.5
    note = ablate._config_file_note(plan)
    assert "changed since this grid began" in note() and note() == ""      # said once


def test_a_foreign_run_is_left_out_of_its_variant(tmp_path, capsys):
    out = tmp_path / "abl"
    plan = _claimed(out, "--grid", "MODEL.USE_SSL=True,False", "--seeds", "2", "--out", str(out))
    _write_run(out, plan, "USE_SSL=True", 1234, 0.5)
    _write_run(out, plan, "USE_SSL=True", 1235, 0.7)
    _write_run(out, plan, "USE_SSL=False", 1234, 0.4)
    # a run of the other variant copied into USE_SSL=False/seed_1235
    other = load_config(ablate.grid_config(str(out), plan), ["MODEL.USE_SSL", "True", "SOLVER.SEED", "1235"]).dump()
    foreign = _write_run(out, plan, "USE_SSL=False", 1235, 0.9, config=other)
    rows = {r["variant"]: r for r in ablate.build_report(str(out))}
    assert rows["USE_SSL=False"]["n"] == 1 and rows["USE_SSL=False"]["mAP_mean"] == pytest.approx(0.4)
    assert rows["USE_SSL=False"]["mismatched"] == ["seed 1235: MODEL.USE_SSL = True (variant: False)"]
    assert rows["USE_SSL=True"]["n"] == 2 and not rows["USE_SSL=True"]["mismatched"]
    ablate.write_report(str(out))
    assert "1 left out, not of this variant" in (out / "results.md").read_text()
    # a re-run leaves it alone and says so; a begun run of other settings starts again
    assert ablate._checked_state(plan, str(out), foreign, "done", {}) == "foreign"
    os.remove(os.path.join(foreign.folder, "results.json"))
    assert ablate._checked_state(plan, str(out), foreign, "partial", {}) == "new"
    printed = capsys.readouterr().out
    assert "left out USE_SSL=False/seed_1235" in printed and "restart USE_SSL=False/seed_1235" in printed


def test_regenerated_data_is_told_from_the_data_a_run_began_on(tmp_path):
    data = synthetic_set(tmp_path / "data")
    out = tmp_path / "abl"
    plan = _claimed(out, "--grid", "MODEL.USE_SSL=False", "--out", str(out), "DATASETS.ROOT_DIR", data)
    run = ablate.runs_of(plan, str(out))[0]
    began = ablate.data_identity(plan, str(out), run)
    status = {run.key: {"ran": {"data": began}}}
    assert ablate.data_change(plan, str(out), run, status) == ""
    image = sorted((tmp_path / "data" / "bounding_box_train").iterdir())[0]
    kept = image.read_bytes()
    image.write_bytes(kept + b"\0")          # one image replaced under its name
    assert "other image files or contents" in ablate.data_change(plan, str(out), run, status)
    image.write_bytes(kept)
    shutil.rmtree(data)
    synthetic_set(tmp_path / "data", seed=4)      # the same path, other images
    change = ablate.data_change(plan, str(out), run, status)
    assert "data changed" in change and "query/gallery" in change
    assert dataset_change(began, ablate.data_identity(plan, str(out), run)) in change
