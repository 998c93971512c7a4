"""Edges of start-up: config values refused at load, a full disk during logging, the tools'
bad arguments, Ctrl-C / SIGTERM at any moment, ``make clean`` and the README's commands.

Every failure is one ``error: ...`` line naming the culprit (exit 2); an interruption is one
line with exit 130 (Ctrl-C) or 143 (SIGTERM)."""
import os

import pytest

import train_svllreid
from tests.helpers import DEMO, one_line_error

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
@pytest.mark.slow
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


# ----------------------------------------------------------------------------- tools: bad arguments
def _tool(name):
    import importlib
    return importlib.import_module(f"tools.{name}")


@pytest.mark.parametrize("args,names", [
    (["--num-ids", "0"], ["--num-ids 0", ">= 1"]),
    (["--num-test-ids", "0"], ["--num-test-ids 0", ">= 1"]),
    (["--num-cams", "1"], ["--num-cams 1", "another camera"]),
    (["--height", "-8"], ["--height -8", ">= 16"]),
    (["--width", "-1"], ["--width -1", ">= 16"]),
    (["--num-distractors", "-3"], ["--num-distractors -3", ">= 0"]),
    (["--num-junk", "-1"], ["--num-junk -1", ">= 0"]),
    (["--images-per-cam", "-2"], ["--images-per-cam -2", ">= 1"]),
])
def test_make_synthetic_bad_sizes(args, names, tmp_path, capsys):
    out = tmp_path / "set"
    assert _tool("make_synthetic").main(["--out", str(out), *args]) == 2
    one_line_error(capsys, *names)
    assert not out.exists()


def test_make_synthetic_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert _tool("make_synthetic").main(["--out", str(f), "--num-ids", "2", "--num-test-ids", "2"]) == 2
    one_line_error(capsys, f, "is a file")
    assert f.read_text() == "mine"


def test_run_demo_missing_config(tmp_path, capsys):
    missing = tmp_path / "nope.yml"
    assert _tool("run_demo").main(["--config_file", str(missing)]) == 2
    one_line_error(capsys, missing, "not found")


@pytest.mark.parametrize("key", ["SOLVER.STAGE1.MAX_EPOCHS", "SOLVER.STAGE2.MAX_EPOCHS"])
def test_run_demo_zero_epochs(key, tmp_path, capsys):
    out = tmp_path / "demo"
    assert _tool("run_demo").main(["--config_file", DEMO, "OUTPUT_DIR", str(out), key, "0"]) == 2
    one_line_error(capsys, key, "positive integer")
    assert not out.exists()


@pytest.mark.slow
def test_demo_ends_with_its_results_table_and_runnable_hints(tiny_root, tmp_path, monkeypatch, capsys):
    import json
    import shlex
    import subprocess

    from tests.helpers import TINY
    monkeypatch.chdir(ROOT)           # make demo runs in the repository root; the hints are relative to it
    out = tmp_path / "demo"
    assert _tool("run_demo").main(["--config_file", DEMO, "DATASETS.ROOT_DIR", str(tiny_root),
                                   "OUTPUT_DIR", str(out), *TINY, "SOLVER.STAGE2.MAX_EPOCHS", "1",
                                   "SOLVER.STAGE2.EVAL_PERIOD", "1", "TEST.VISUALIZE", "False"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    saved = json.loads((out / "demo_results.json").read_text())
    table = lines[-4:]                # header, untrained, trained, ratio + time: the last thing printed
    assert table[0].split() == ["mAP", "Rank-1", "Rank-5", "mINP"]
    for row, name in zip(table[1:3], ("untrained", "trained")):
        r = saved[name]
        assert row.split() == [name, f"{100 * r['mAP']:.1f}%", f"{100 * r['cmc'][0]:.1f}%",
                               f"{100 * r['cmc'][4]:.1f}%", f"{100 * r['mINP']:.1f}%"]
    assert "the demo took" in table[3] and " s (" in table[3]
    hints = [ln.strip() for ln in lines if "tools/extract_features.py" in ln or "tools/search.py" in ln]
    assert len(hints) == 2
    for hint in hints:
        argv = shlex.split(hint)
        assert not argv[0].startswith("python") or argv[0] == "python"
        assert os.path.isfile(os.path.join(ROOT, argv[1]))
    r = subprocess.run(shlex.split(hints[0]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "query_features.npz").is_file()


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM
ENTRY_POINTS = ["train_svllreid.py", "test_svllreid.py", "tools/extract_features.py", "tools/search.py",
                "tools/plot_curves.py", "tools/export_onnx.py", "tools/run_demo.py", "tools/make_synthetic.py",
                "tools/ablate.py", "tools/build_index.py"]
# Entry points whose start-up loads neither torch nor numpy (nothing slow to interrupt; checked
# in tests/test_layout.py): the Ctrl-C-during-the-imports test has no window there.
LIGHT_ENTRY_POINTS = ["tools/plot_curves.py"]


def _env():
    return {**os.environ, "SVLLREID_PROGRESS": "off", "OMP_NUM_THREADS": "1"}


def _importing(pid):
    """True once the process has loaded torch's or numpy's native library: its imports are under way."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except OSError:
        return False
    return "libtorch" in maps or "_multiarray_umath" in maps


def _signal_when(proc, ready, sig, timeout=120):
    import time
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return err


def _one_line(err, start):
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("WARNING") and "warn" not in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith(start), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see the imports under way")
@pytest.mark.parametrize("script", [s for s in ENTRY_POINTS if s not in LIGHT_ENTRY_POINTS])
def test_ctrl_c_during_the_imports_is_one_line(script):
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _signal_when(proc, lambda: _importing(proc.pid), signal.SIGINT)
    assert proc.returncode == 130, err
    _one_line(err, "interrupted")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see the imports under way")
def test_sigterm_during_the_imports_is_one_line():
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "train_svllreid.py", "--help"], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _signal_when(proc, lambda: _importing(proc.pid), signal.SIGTERM)
    assert proc.returncode == 143, err
    _one_line(err, "terminated (SIGTERM)")


def _train_cmd(script, root, out, *opts):
    import sys

    from tests.helpers import train_argv
    return [sys.executable, script, *train_argv(root, out, "SOLVER.STAGE2.MAX_EPOCHS", "50", *opts)]


@pytest.mark.slow
def test_sigterm_during_training_says_where_and_how_to_resume(tiny_root, tmp_path):
    import re
    import signal
    import subprocess

    from utils.checkpoint import load_file
    out = tmp_path / "out"
    proc = subprocess.Popen(_train_cmd("train_svllreid.py", tiny_root, out), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _signal_when(proc, lambda: os.path.exists(out / "ViT-B-16_1.pth"), signal.SIGTERM)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM): stopped in stage 2") and "Traceback" not in err, err
    assert f"train_svllreid.py --resume OUTPUT_DIR {out}" in last
    held = re.search(r"last.pth holds the end of stage (\d) epoch (\d+)", last)
    state = load_file(str(out / "last.pth"))
    assert held and (state["stage"], state["epoch"]) == (int(held.group(1)), int(held.group(2))), last


@pytest.mark.slow
def test_ctrl_c_during_the_demo_says_how_to_go_on(tiny_root, tmp_path):
    import signal
    import subprocess
    out = tmp_path / "demo"
    proc = subprocess.Popen(_train_cmd("tools/run_demo.py", tiny_root, out), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _signal_when(proc, lambda: os.path.exists(out / "ViT-B-16_1.pth"), signal.SIGINT)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped in stage 2") and "Traceback" not in err, err
    assert "make demo" in last and f"--resume OUTPUT_DIR {out}" in last


# ----------------------------------------------------------------------------- a full disk while logging
def _tmpfs(tmp_path, size):
    """A real tmpfs of ``size`` mounted under ``tmp_path`` (as tests/test_faults.py does); skip without root."""
    import subprocess
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)   # a log handler may still hold a file


@pytest.fixture
def small_disk(tmp_path):
    """256 kB: full after a few lines."""
    yield from _tmpfs(tmp_path, "256k")


@pytest.fixture
def disk_for_a_run(tmp_path):
    """48 MB: room for a tiny run's checkpoints, small enough to fill quickly."""
    yield from _tmpfs(tmp_path, "48m")


def _fill(folder, name="filler"):
    """Write ``folder/name`` until the file system is full."""
    import errno
    with open(os.path.join(folder, name), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_full_disk_in_metrics_jsonl_names_the_file_and_keeps_earlier_lines(small_disk):
    import errno

    from utils.record import METRICS_FILE, TrainingRecord, read_metrics
    rec = TrainingRecord(str(small_disk), tensorboard=False)
    rec.log(1, 1, 1, loss=0.5)
    _fill(small_disk)
    with pytest.raises(OSError) as e:
        for i in range(100):      # the first record that does not fit
            rec.log(1, 1, i, loss=0.25, note="x" * 200)
    path = str(small_disk / METRICS_FILE)
    assert e.value.errno == errno.ENOSPC and path in str(e.value) and "no space left" in str(e.value)
    assert "\n" not in str(e.value)
    rec.close()                   # the unwritten rest is dropped without a second error
    assert read_metrics(path)[0]["loss"] == 0.5


def test_full_disk_in_train_log_is_one_error_not_a_traceback_per_line(small_disk, capsys):
    import errno

    from utils.logger import setup_logger
    logger = setup_logger("svllreid-disk-test", str(small_disk), if_train=True)
    logger.info("first line")
    _fill(small_disk)
    with pytest.raises(OSError) as e:
        for i in range(200):
            logger.info("line %d %s", i, "y" * 200)
    path = str(small_disk / "train_log.txt")
    assert e.value.errno == errno.ENOSPC and path in str(e.value)
    logger.info("after the failure")          # logging on does not print tracebacks either
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
    assert "first line" in (small_disk / "train_log.txt").read_text()


@pytest.mark.slow
def test_disk_filling_up_during_training_is_one_line_and_keeps_the_run(tiny_root, disk_for_a_run, monkeypatch,
                                                                       capsys):
    import logging

    import processor.processor_stage2 as stage2_mod
    from tests.helpers import train_argv
    from utils.checkpoint import load_file
    from utils.record import read_metrics
    out = disk_for_a_run / "run"
    from processor.position import POSITION
    original = stage2_mod.stage2_forward_loss

    def fill_in_epoch_2(*a, **k):
        if (POSITION.stage, POSITION.epoch) == (2, 2) and not (disk_for_a_run / "filler").exists():
            _fill(disk_for_a_run)     # last.pth holds stage 2 epoch 1
            # tmpfs still takes the few bytes left in the log's last page: log as a longer epoch would
            for i in range(100):
                logging.getLogger("svllreid").info("iteration %d of a longer epoch %s", i, "." * 100)
        return original(*a, **k)

    monkeypatch.setattr(stage2_mod, "stage2_forward_loss", fill_in_epoch_2)
    assert train_svllreid.main(train_argv(tiny_root, out, "SOLVER.STAGE2.MAX_EPOCHS", "3",
                                          "SOLVER.STAGE2.LOG_PERIOD", "1")) == 2
    err = one_line_error(capsys, "no space left on device", str(out))
    assert "train_log.txt" in err or "metrics.jsonl" in err, err
    state = load_file(str(out / "last.pth"))         # the run's earlier files are intact
    assert (state["stage"], state["epoch"]) == (2, 1)
    assert read_metrics(str(out / "metrics.jsonl"))
    assert "Settings, every key in" in (out / "train_log.txt").read_text()


# ----------------------------------------------------------------------------- the README's commands
def _readme_commands():
    """Every command line of README.md and docs/*.md that runs a Python script:
    (line, interpreter, script, argv after the script)."""
    import glob
    import re
    import shlex
    pages = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    text = "\n".join(open(p).read() for p in pages)
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`((?:\.venv/bin/)?python3? [^`]+)`", text)
    out = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if argv[0] in ("python", "python3", ".venv/bin/python") or argv[0].endswith("torchrun"):
            script = next(a for a in argv if a.endswith(".py"))
            out.append((line.strip(), argv[0], script, argv[argv.index(script) + 1:]))
    return out


README_COMMANDS = _readme_commands()


def test_readme_commands_are_found():
    scripts = {c[2] for c in README_COMMANDS}
    assert {"train_svllreid.py", "test_svllreid.py", "tools/extract_features.py", "tools/search.py",
            "tools/plot_curves.py", "tools/export_onnx.py", "tools/run_demo.py"} <= scripts, scripts


class _Parsed(Exception):
    pass


def _script_main(script):
    if script.startswith("tools/"):
        return _tool(os.path.splitext(os.path.basename(script))[0]).main
    import importlib
    return importlib.import_module(os.path.splitext(script)[0]).main


@pytest.mark.slow
@pytest.mark.parametrize("line,python,script,args", README_COMMANDS, ids=[c[0][:60] for c in README_COMMANDS])
def test_readme_command_runs_as_written(line, python, script, args, monkeypatch, capsys):
    """The interpreter is the one `make` installs, the script and config exist, its flags parse,
    the config keys it overrides exist, and ``--help`` works."""
    import argparse
    import re

    from config import get_default_config, get_key
    assert python in (".venv/bin/python", ".venv/bin/torchrun"), line
    assert os.path.isfile(os.path.join(ROOT, script)), line
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = _script_main(script)
    with pytest.raises(_Parsed) as parsed:
        main(args)
    ns = vars(parsed.value.args[0])
    if ns.get("config_file"):
        assert os.path.isfile(os.path.join(ROOT, ns["config_file"])), line
    cfg = get_default_config()
    for key in ns.get("opts") or []:
        if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*", key) and key != "KEY":
            get_key(cfg, key)         # KeyError: the README overrides a key that does not exist
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_tensorboard_write_error_names_the_folder(tmp_path):
    """The event files are written by TensorBoard's own writer; its write error is named too."""
    import errno

    from utils.record import TENSORBOARD_DIR, TrainingRecord

    class FullWriter:
        def add_scalar(self, *a):
            pass

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    rec = TrainingRecord(str(tmp_path), tensorboard=False)
    rec._writer = FullWriter()
    with pytest.raises(OSError) as e:
        rec.log(1, 1, 1, loss=0.5)
    assert str(tmp_path / TENSORBOARD_DIR) in str(e.value) and "no space left" in str(e.value)
    rec.close()                    # no second error while the run stops


def test_sigterm_during_a_write_completes_the_file_first(tmp_path):
    """As for Ctrl-C: a SIGTERM inside an atomic write is held until the file is complete."""
    import signal
    import time

    from utils.entry import Terminated, work_signals
    from utils.fileio import atomic_write
    path = tmp_path / "w.bin"

    def write_and_get_terminated(f):
        f.write(b"a" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        f.write(b"b" * 1000)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), work_signals():
        atomic_write(str(path), write_and_get_terminated)
    assert path.read_bytes() == b"a" * 1000 + b"b" * 1000
    assert signal.getsignal(signal.SIGTERM) == before     # handlers restored


def test_startup_guard_acts_only_in_the_program_itself():
    """Importing an entry point (as the tests do) leaves the signal handlers alone."""
    import signal

    from utils.entry import _exit_during_startup
    _tool("run_demo")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is not _exit_during_startup
