"""Edges of start-up: config values refused at load, a full disk during logging, the tools'
bad arguments, Ctrl-C / SIGTERM at any moment, ``make clean`` and the README's commands.

Every failure is one ``error: ...`` line naming the culprit (exit 2); an interruption is one
line with exit 130 (Ctrl-C) or 143 (SIGTERM)."""
import os

import pytest

import train_svllreid

from test_faults import one_line_error
from test_training import DEMO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- config values at load
@pytest.mark.parametrize("key,value,expected", [
    ("SOLVER.SEED", "-1", "[0, 2**32 - 1]"),
    ("INPUT.PIXEL_STD", "[0.5, 0.0, 0.5]", "> 0"),
    ("INPUT.PIXEL_MEAN", "[0.5, 0.5]", "three numbers"),
    ("INPUT.PIXEL_STD", "[0.5, 0.5, 0.5, 0.5]", "three numbers"),
    ("SOLVER.STAGE2.STEPS", "[50, 30]", "increasing"),
    ("OUTPUT_DIR", "''", "folder"),
])
def test_bad_value_override_fails_at_load(key, value, expected, tmp_path, capsys):
    opts = ["OUTPUT_DIR", str(tmp_path / "o"), key, value]
    assert train_svllreid.main(["--config_file", DEMO, *opts]) == 2
    one_line_error(capsys, key, expected)
    assert not os.path.exists(tmp_path / "o")       # refused before any work


@pytest.mark.parametrize("section,key,text", [
    ("INPUT", "SIZE_TRAIN", "[256, abc]"), ("INPUT", "SIZE_TEST", "[high, 128]"),
    ("MODEL", "STRIDE_SIZE", "[12, '12']"), ("INPUT", "SIZE_TRAIN", "[256.5, 128]"),
    ("INPUT", "PIXEL_MEAN", "[0.5, grey, 0.5]"),
])
def test_non_numeric_yaml_value_fails_at_load(section, key, text, tmp_path, capsys):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"{section}:\n  {key}: {text}\n")
    assert train_svllreid.main(["--config_file", str(cfg), "OUTPUT_DIR", str(tmp_path / "o")]) == 2
    one_line_error(capsys, f"{section}.{key}", "must be")
    assert not os.path.exists(tmp_path / "o")


def test_seed_and_steps_at_their_limits_load():
    from config import load_config
    cfg = load_config(DEMO, ["SOLVER.SEED", "0", "SOLVER.STAGE2.STEPS", "[5, 5, 9]",
                             "INPUT.PIXEL_MEAN", "[0, 1, 0.25]"])
    assert cfg.SOLVER.SEED == 0 and list(cfg.SOLVER.STAGE2.STEPS) == [5, 5, 9]
    assert load_config(DEMO, ["SOLVER.SEED", str(2 ** 32 - 1)]).SOLVER.SEED == 2 ** 32 - 1


# ----------------------------------------------------------------------------- make clean
def test_make_clean_removes_only_what_the_demo_and_tests_create(tmp_path):
    import glob
    import shutil
    import subprocess

    import yaml
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path / "Makefile")
    configs = sorted(glob.glob(os.path.join(ROOT, "configs", "demo", "*.yml")))
    demo_outs = [yaml.safe_load(open(p))["OUTPUT_DIR"] for p in configs]
    assert "output/demo" in demo_outs
    made = demo_outs + ["data/synthetic/query", ".pytest_cache"]
    kept = ["output/market", "output/my_run/previous-1", "data/Market-1501"]
    for d in made + kept:
        os.makedirs(tmp_path / d)
        (tmp_path / d / "f.txt").write_text("x")
    r = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for d in made:
        assert not os.path.exists(tmp_path / d), d
    for d in kept:
        assert (tmp_path / d / "f.txt").read_text() == "x", d
