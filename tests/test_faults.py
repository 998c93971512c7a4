"""Faults and bad input, tried as a user would: every case is one line on stderr naming the
culprit, exit code 2 (130 for Ctrl-C), and nothing earlier is lost."""
import errno
import glob
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import processor.processor_stage2 as stage2_mod
import test_svllreid
import train_svllreid
from config import ConfigError
from config.resume import resume_config
from datasets.bases import read_image
from tests.helpers import DEMO, TINY, lock_held_elsewhere, one_line_error, snapshot, tool_opts, train_argv
from utils.checkpoint import CheckpointError, load_file, save_atomic
from utils.fileio import TMP_PREFIX, TMP_SUFFIX
from utils.run_dir import RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture
def data_copy(tiny_root, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(tiny_root, dst)
    return dst


# ----------------------------------------------------------------------------- one run per folder
@pytest.mark.slow
def test_second_run_on_a_locked_folder_fails_at_once(tiny_root, tmp_path, capsys):
    out = tmp_path / "out"
    with lock_held_elsewhere(out) as holder:
        t0 = time.time()
        assert train_svllreid.main(train_argv(tiny_root, out)) == 2
        one_line_error(capsys, out, f"pid {holder.pid}", "in use")
        assert time.time() - t0 < 10
    with RunLock(str(out)):      # released with the holder's death: no stale lock
        pass


@pytest.mark.slow
def test_new_run_refuses_a_folder_holding_a_run(tiny_root, run_copy, capsys):
    before = snapshot(run_copy)
    assert train_svllreid.main(train_argv(tiny_root, run_copy)) == 2
    one_line_error(capsys, run_copy, "--resume", "--overwrite")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_overwrite_moves_the_previous_run_aside(tiny_root, run_copy, monkeypatch):
    before = snapshot(run_copy)
    # start over, but stop at the first saved state (no need to train the whole run)
    monkeypatch.setattr(train_svllreid, "do_train_stage1", _raise(KeyboardInterrupt))
    assert train_svllreid.main(train_argv(tiny_root, run_copy, "--overwrite")) == 130
    moved = glob.glob(str(run_copy / "previous-*"))
    assert len(moved) == 1
    kept = snapshot(moved[0])
    assert {k: v for k, v in before.items() if k in kept} == kept and set(kept) >= {"last.pth", "config.yaml"}


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


@pytest.mark.slow
def test_resume_uses_the_saved_config_and_refuses_conflicts(tiny_root, run_copy, capsys):
    # the run was made with STAGE2.MAX_EPOCHS 2; resuming without a config file reads it back
    cfg = resume_config("", ["OUTPUT_DIR", str(run_copy)])
    assert cfg.SOLVER.STAGE2.MAX_EPOCHS == 2 and cfg.DATASETS.ROOT_DIR == str(tiny_root)
    # a key that may change (where the data is) is taken; one that changes the run is refused
    assert resume_config("", ["OUTPUT_DIR", str(run_copy), "DATALOADER.NUM_WORKERS", "1"]).DATALOADER.NUM_WORKERS == 1
    with pytest.raises(ConfigError, match=r"SOLVER.STAGE2.BASE_LR = 0.1 conflicts .* saved value 0.0005"):
        resume_config("", ["OUTPUT_DIR", str(run_copy), "SOLVER.STAGE2.BASE_LR", "0.1"])
    before = snapshot(run_copy)
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy), "SOLVER.STAGE2.MAX_EPOCHS", "5"]) == 2
    one_line_error(capsys, "SOLVER.STAGE2.MAX_EPOCHS", "5", "2")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_resume_of_a_finished_run_with_only_the_folder(run_copy):
    import json
    with open(run_copy / "results.json") as f:
        saved = json.load(f)
    stale = run_copy / f"{TMP_PREFIX}killed{TMP_SUFFIX}"
    stale.write_bytes(b"half a checkpoint")
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy)]) == 0
    with open(run_copy / "results.json") as f:
        assert json.load(f)["mAP"] == saved["mAP"]
    assert not stale.exists()     # leftovers of an interrupted write are removed at the next start


@pytest.mark.slow
def test_files_follow_the_umask(run_copy):
    mode = 0o666 & ~_umask()
    for name in ("last.pth", "ViT-B-16_2.pth", "results.json", "config.yaml", "train_log.txt"):
        assert stat.S_IMODE(os.stat(run_copy / name).st_mode) == mode, name


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


# ----------------------------------------------------------------------------- divergence
@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_finite_state(tiny_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    original = stage2_mod.stage2_forward_loss
    calls = []

    def nan_in_epoch_2(cfg, *a, **k):
        loss, parts, o = original(cfg, *a, **k)
        calls.append(1)
        if len(calls) > 2:      # past the first epoch's batches
            parts["tri"] = parts["tri"] * float("nan")
            loss = loss + parts["tri"]
        return loss, parts, o

    monkeypatch.setattr(stage2_mod, "stage2_forward_loss", nan_in_epoch_2)
    assert train_svllreid.main(train_argv(tiny_root, out, "SOLVER.STAGE2.MAX_EPOCHS", "3")) == 2
    err = one_line_error(capsys, "stage 2", "epoch", "iteration", "tri nan", "SOLVER.STAGE2.BASE_LR")
    assert "non-finite" in err
    state = load_file(str(out / "last.pth"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not os.path.exists(out / "results.json")
    for ckpt in glob.glob(str(out / "*.pth")):
        sd = load_file(ckpt)
        sd = sd.get("model", sd)
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@pytest.mark.slow
def test_huge_learning_rate_is_caught(tiny_root, tmp_path, capsys):
    """A real divergence (no patching): SGD at an absurd learning rate."""
    out = tmp_path / "out"
    code = train_svllreid.main(train_argv(tiny_root, out, "SOLVER.STAGE2.OPTIMIZER_NAME", "SGD",
                                          "SOLVER.STAGE2.BASE_LR", "1e12", "SOLVER.STAGE2.MAX_EPOCHS", "4"))
    assert code == 2
    one_line_error(capsys, "stage 2", "non-finite")
    assert not os.path.exists(out / "results.json")


def test_checkpoint_with_non_finite_values_is_never_written(tmp_path):
    path = tmp_path / "w.pth"
    save_atomic({"a": torch.ones(2)}, str(path))
    before = path.read_bytes()
    bad = {"a": torch.tensor([1.0, float("inf")])}
    with pytest.raises(CheckpointError, match="non-finite .*a"):
        save_atomic(bad, str(path), check_finite=bad)
    assert path.read_bytes() == before


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it lives on CUDA, as a GPU run's weights and optimiser state do; its
    ``.cpu()`` is the plain tensor. Saved as it is, a plain ``torch.load`` cannot read it back."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def _all_tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_tensors(v)


def test_checkpoints_are_saved_with_cpu_tensors(tmp_path):
    """Weights files and last.pth (optimiser state included) hold plain CPU tensors, whatever device
    the run's tensors are on: a published-style torch.load without map_location reads them."""
    from processor.amp import make_scaler
    from processor.train_state import save_train_state, save_weights
    model = torch.nn.Linear(3, 2)
    model.register_buffer("stat", torch.arange(3.0).as_subclass(_ClaimsCuda))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[model.weight]["momentum_buffer"] = torch.ones(2, 3).as_subclass(_ClaimsCuda)
    assert model.state_dict()["stat"].device.type == "cuda"          # what the emulation claims
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    save_train_state(str(tmp_path), 2, 1, model, opt, sched, make_scaler(torch.device("cpu")), "cfg")
    save_weights(str(tmp_path), "w.pth", model)
    for name in ("last.pth", "w.pth"):
        loaded = torch.load(tmp_path / name)                          # no map_location, weights only
        tensors = list(_all_tensors(loaded))
        assert tensors and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors), name
    last = torch.load(tmp_path / "last.pth")
    assert torch.equal(last["model"]["stat"], torch.arange(3.0))
    assert torch.equal(last["optimizer"]["state"][0]["momentum_buffer"], torch.ones(2, 3))
    assert hasattr(torch.load(tmp_path / "w.pth"), "_metadata")       # the state dict's versions kept


@pytest.mark.slow
def test_evaluation_refuses_non_finite_features(finished_run, tiny_root, tmp_path, capsys):
    sd = load_file(str(finished_run / "ViT-B-16_2.pth"))
    sd["bottleneck.running_mean"][0] = float("nan")
    key = next(k for k in sd if k.startswith("image_encoder.") and sd[k].is_floating_point())
    sd[key].fill_(float("nan"))
    weight = tmp_path / "nan.pth"
    torch.save(sd, weight)
    assert test_svllreid.main(["--config_file", DEMO, "DATASETS.ROOT_DIR", str(tiny_root), *TINY,
                               "TEST.WEIGHT", str(weight), "OUTPUT_DIR", str(tmp_path / "eval")]) == 2
    one_line_error(capsys, "NaN/Inf", "features")


# ----------------------------------------------------------------------------- batches that train nothing
def test_batch_needing_more_identities_than_the_data_has(tiny_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_svllreid.main(train_argv(tiny_root, out, "SOLVER.STAGE2.IMS_PER_BATCH", "40")) == 2
    one_line_error(capsys, "SOLVER.STAGE2.IMS_PER_BATCH = 40", "needs 20 identities", "has 8")
    assert not glob.glob(str(out / "*.pth"))


def test_one_identity_per_batch_is_refused(capsys):
    assert train_svllreid.main(["--config_file", DEMO, "SOLVER.STAGE2.IMS_PER_BATCH", "4",
                                "DATALOADER.NUM_INSTANCE", "4"]) == 2
    one_line_error(capsys, "one identity per batch", "triplet")


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("key,value", [
    ("SOLVER.STAGE1.MAX_EPOCHS", "0"), ("SOLVER.STAGE2.MAX_EPOCHS", "0"),
    ("SOLVER.STAGE1.LOG_PERIOD", "0"), ("SOLVER.STAGE1.CHECKPOINT_PERIOD", "0"),
    ("SOLVER.STAGE2.LOG_PERIOD", "0"), ("SOLVER.STAGE2.CHECKPOINT_PERIOD", "0"),
    ("SOLVER.STAGE2.EVAL_PERIOD", "0"), ("DATALOADER.NUM_WORKERS", "-2"), ("INPUT.PADDING", "-1"),
    ("SOLVER.STAGE1.BASE_LR", "0.0"), ("SOLVER.STAGE2.BASE_LR", "-0.0001"), ("DATALOADER.NUM_INSTANCE", "0"),
])
def test_bad_values_fail_at_load(key, value, tmp_path, capsys):
    assert train_svllreid.main(["--config_file", DEMO, "OUTPUT_DIR", str(tmp_path / "o"), key, value]) == 2
    one_line_error(capsys, key, value)
    assert not os.path.exists(tmp_path / "o")       # refused before any work


def test_yaml_syntax_error_keeps_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("MODEL:\n  NAME: 'ViT-B-16'\n  DEVICE: [cpu\nSOLVER:\n  SEED: 1\n")
    assert train_svllreid.main(["--config_file", str(bad)]) == 2
    err = one_line_error(capsys, bad, "YAML syntax error", "line ")
    assert "column" in err


def test_a_config_file_of_random_bytes_is_one_line(tmp_path, capsys):
    binary = tmp_path / "binary.yml"
    binary.write_bytes(bytes(range(128, 256)) * 3)
    assert train_svllreid.main(["--config_file", str(binary), "OUTPUT_DIR", str(tmp_path / "o")]) == 2
    one_line_error(capsys, binary, "is not a text (YAML) file")
    assert not os.path.exists(tmp_path / "o")


def test_resume_with_a_cut_off_config_yaml_does_not_call_defaults_saved(tmp_path):
    """A config.yaml cut short still parses; the keys it lost take their defaults. A conflict on such
    a key was reported as "the run's saved value 'pretrained'", a value the file never held."""
    from config import load_config
    run = tmp_path / "run"
    run.mkdir()
    dump = load_config(DEMO, ["OUTPUT_DIR", str(run)]).dump()
    (run / "config.yaml").write_text(dump[:300])
    with pytest.raises(ConfigError) as e:
        resume_config(DEMO, ["OUTPUT_DIR", str(run)])
    msg = str(e.value)
    key = msg.split("--resume: ", 1)[1].split(" = ", 1)[0]
    assert "saved value" not in msg, msg
    assert f"{run / 'config.yaml'} does not have {key}" in msg and "keys missing" in msg, msg


# ----------------------------------------------------------------------------- data
def _break_subset(root, subset):
    for f in glob.glob(os.path.join(root, subset, "*")):
        os.remove(f)


@pytest.mark.parametrize("subset,label", [("query", "query"), ("bounding_box_test", "gallery"),
                                          ("bounding_box_train", "train")])
def test_empty_subset(data_copy, tmp_path, subset, label, capsys):
    _break_subset(data_copy, subset)
    assert train_svllreid.main(train_argv(data_copy, tmp_path / "out")) == 2
    one_line_error(capsys, label, "empty")


def test_single_camera_data_explains_the_same_camera_rule(data_copy, tmp_path, capsys):
    for sub in ("query", "bounding_box_test"):
        for f in glob.glob(os.path.join(data_copy, sub, "*.jpg")):
            name = os.path.basename(f)
            pid, rest = name.split("_c", 1)
            os.rename(f, os.path.join(os.path.dirname(f), f"{pid}_c1{rest[1:]}"))
    assert train_svllreid.main(train_argv(data_copy, tmp_path / "out")) == 2
    one_line_error(capsys, "no query can be evaluated", "another camera")


def test_per_identity_subfolders_are_explained(data_copy, tmp_path, capsys):
    q = data_copy / "query"
    for f in glob.glob(str(q / "*.jpg")):
        d = q / os.path.basename(f)[:4]
        d.mkdir(exist_ok=True)
        shutil.move(f, d)
    assert train_svllreid.main(train_argv(data_copy, tmp_path / "out")) == 2
    one_line_error(capsys, str(q), "sub-folders", "flat")


def test_unreadable_gallery_image_is_found_before_training(data_copy, tmp_path, capsys):
    victim = sorted(glob.glob(str(data_copy / "bounding_box_test" / "*.jpg")))[3]
    with open(victim, "w") as f:
        f.write("not an image")
    out = tmp_path / "out"
    t0 = time.time()
    assert train_svllreid.main(train_argv(data_copy, out)) == 2
    one_line_error(capsys, victim, "gallery")
    assert not glob.glob(str(out / "*.pth")) and time.time() - t0 < 30


@pytest.mark.slow
def test_an_image_unreadable_in_a_loader_worker_is_one_line(data_copy, weight, tmp_path, capsys):
    """A query whose data is cut off (its header reads) fails in a loader worker; the user sees the
    worker's error, naming the file, as one line, not the worker's traceback."""
    victim = sorted(glob.glob(str(data_copy / "query" / "*.jpg")))[2]
    with open(victim, "rb") as f:
        data = f.read()
    with open(victim, "wb") as f:
        f.write(data[:300])
    argv = ["--config_file", DEMO, *tool_opts(data_copy, weight, "DATALOADER.NUM_WORKERS", "1",
                                              "DATALOADER.READ_RETRIES", "0", "OUTPUT_DIR", str(tmp_path / "out"))]
    assert test_svllreid.main(argv) == 2
    err = one_line_error(capsys, victim, "cannot read image")
    assert "DataLoader worker" not in err and "Original" not in err


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "LA", "P", "RGBA", "CMYK", "1", "L"])
def test_every_image_mode_is_read_as_8bit_rgb(tmp_path, mode):
    grey = np.linspace(0, 1, 64 * 32).reshape(64, 32)
    if mode == "I;16":
        img, expect = Image.fromarray((grey * 65535).astype(np.uint16)), grey * 255
    elif mode == "I":
        img, expect = Image.fromarray((grey * 65535).astype(np.int32)), grey * 65535 / 257
    elif mode == "F":
        img, expect = Image.fromarray(grey.astype(np.float32)), grey * 255
    else:
        img, expect = Image.fromarray((grey * 255).astype(np.uint8)).convert(mode), None
    ext = ".tiff" if mode in ("F", "CMYK", "I") else ".png"
    path = str(tmp_path / f"x{ext}")
    img.save(path)
    rgb = np.asarray(read_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 32, 3)
    if expect is not None:
        assert np.abs(rgb[..., 0].astype(float) - expect).max() <= 1.0    # scaled, not clipped to white
    assert rgb.std() > 10


def test_decompression_bomb_in_the_gallery_stops_before_training(data_copy, tmp_path, monkeypatch, capsys):
    victim = [p for p in sorted(glob.glob(str(data_copy / "bounding_box_test" / "*.jpg")))
              if not os.path.basename(p).startswith("-1")][0]      # junk images are not read at all
    Image.new("RGB", (200, 200)).save(victim, format="JPEG")      # 40,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15000)          # the set's 64x32 images stay below
    out = tmp_path / "out"
    assert train_svllreid.main(train_argv(data_copy, out)) == 2
    one_line_error(capsys, victim, "gallery", "DecompressionBombError")
    assert not glob.glob(str(out / "*.pth"))


def test_decompression_bomb_is_one_clear_error(tmp_path, monkeypatch):
    path = str(tmp_path / "big.png")
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(OSError) as e:
        read_image(path, retries=3)
    assert path in str(e.value) and "\n" not in str(e.value) and "attempts" not in str(e.value)


# ----------------------------------------------------------------------------- checkpoints
def _damaged_files(tmp_path, good):
    data = open(good, "rb").read()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "text": b"hello, not a checkpoint\n",
             "garbage": b"garbage\n",
             "pickle": pickle.dumps({"w": [1, 2, 3]}), "object pickle": pickle.dumps(object)}
    out = {}
    for name, content in files.items():
        p = tmp_path / f"{name.replace(' ', '_')}.pth"
        p.write_bytes(content)
        out[name] = p
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    out["torch list"] = tmp_path / "list.pth"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "garbage", "pickle", "object pickle", "torch list"])
def test_damaged_test_weight(finished_run, tiny_root, tmp_path, kind, capsys):
    weight = _damaged_files(tmp_path, finished_run / "ViT-B-16_2.pth")[kind]
    assert test_svllreid.main(["--config_file", DEMO, "DATASETS.ROOT_DIR", str(tiny_root), *TINY,
                               "TEST.WEIGHT", str(weight), "OUTPUT_DIR", str(tmp_path / "eval")]) == 2
    err = one_line_error(capsys, weight)
    if kind in ("truncated", "text", "garbage"):     # not a real pickle/archive: said so, not "unsafe objects"
        assert "damaged" in err and "weights_only" not in err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "pickle", "torch list"])
def test_damaged_last_pth(run_copy, kind, capsys):
    src = _damaged_files(run_copy.parent, run_copy / "last.pth")[kind]
    shutil.copy(src, run_copy / "last.pth")
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy)]) == 2
    one_line_error(capsys, run_copy / "last.pth")


def test_a_cut_off_checkpoint_gives_torch_s_reason_in_whole_words(tmp_path):
    """The reason in the one line is torch's own words, its first sentence, never cut in the middle of a
    word (it ended "... This is an internal miniz error. If yo)")."""
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.ones(5000)}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(RuntimeError) as torch_error:
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError) as e:
        load_file(str(path))
    msg = str(e.value)
    reason = msg[msg.index("(") + 1:msg.rindex(")")]
    torch_words = set(" ".join(str(torch_error.value).split()).replace(".", " ").split())
    assert reason and set(reason.removesuffix(" ...").split()) <= torch_words, (reason, torch_error.value)
    assert "\n" not in msg and str(path) in msg


def test_a_folder_as_checkpoint_or_a_file_as_output_dir_is_said_so(tmp_path, capsys):
    """TEST.WEIGHT naming a run folder was "checkpoint not found" (the folder exists); OUTPUT_DIR naming a
    file, or a folder below a file, was "[Errno 17] File exists" / "[Errno 20] Not a directory"."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_file(str(run))
    assert test_svllreid.main(["--config_file", DEMO, "TEST.WEIGHT", str(run), "MODEL.DEVICE", "cpu",
                               "OUTPUT_DIR", str(tmp_path / "eval")]) == 2
    one_line_error(capsys, run, "is a folder, not a checkpoint file")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "below"):
        assert train_svllreid.main(["--config_file", DEMO, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)]) == 2
        one_line_error(capsys, f"OUTPUT_DIR {out} cannot be a folder: {afile} is a file")
    assert afile.read_text() == "keep me"


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_names_the_file_and_keeps_the_previous_one(small_disk):
    path = small_disk / "last.pth"
    save_atomic({"w": torch.ones(1000)}, str(path))     # 4 kB: fits
    before = path.read_bytes()
    with pytest.raises(OSError) as e:
        save_atomic({"w": torch.ones(200_000)}, str(path))   # 800 kB: does not
    assert e.value.errno == errno.ENOSPC and "no space left on device" in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == before
    assert os.listdir(small_disk) == ["last.pth"]            # no half-written temporary file left


# ----------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_is_one_line_and_resumable(tiny_root, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SVLLREID_PROGRESS": "off", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train_svllreid.py", *train_argv(tiny_root, out,
                             "SOLVER.STAGE2.MAX_EPOCHS", "50")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(out / "ViT-B-16_1.pth") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]      # (timm may warn about a 1-epoch cosine schedule before)
    assert last.startswith("interrupted: stopped in stage 2") and "Traceback" not in err, err
    assert f"--resume OUTPUT_DIR {out}" in last
    import re
    held = re.search(r"last.pth holds the end of stage (\d) epoch (\d+)", last)
    assert held, last
    state = load_file(str(out / "last.pth"))     # what the line says is what the file holds
    assert (state["stage"], state["epoch"]) == (int(held.group(1)), int(held.group(2)))


def test_ctrl_c_during_a_write_completes_the_file_first(tmp_path):
    """A SIGINT inside torch.save would surface as an unrelated write error and lose the file:
    it is held until the file is complete, then raised as KeyboardInterrupt."""
    from utils.fileio import atomic_write
    path = tmp_path / "w.bin"

    def write_and_get_interrupted(f):
        f.write(b"a" * 1000)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        f.write(b"b" * 1000)

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), write_and_get_interrupted)
    assert path.read_bytes() == b"a" * 1000 + b"b" * 1000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # handler restored
