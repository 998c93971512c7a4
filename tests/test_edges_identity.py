"""Edges of a run's identity: what a checkpoint, a resumed run and the tools know about the data
they were trained on, and the one-line errors when a file does not belong where it is found."""
import json
import os
import shutil

import pytest
import torch

import test_svllreid
import train_svllreid
from config import load_config
from model import make_model
from processor.common import restore_train_state
from utils.checkpoint import CheckpointMismatchError, load_file

from test_faults import TINY, one_line_error, snapshot, train_argv
from test_training import DEMO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN_DEMO = os.path.join(ROOT, "configs/demo/cnn_svllreid_demo.yml")


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    """A complete tiny run (1 + 2 epochs); tests copy it before touching it."""
    out = tmp_path_factory.mktemp("finished")
    assert train_svllreid.main(train_argv(tiny_root, out)) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _eval(root, weight, out, *extra):
    return test_svllreid.main(["--config_file", DEMO, "DATASETS.ROOT_DIR", str(root), *TINY,
                               "TEST.WEIGHT", str(weight), "OUTPUT_DIR", str(out), *extra])


# ----------------------------------------------------------------------------- --resume checks last.pth
def test_resume_refuses_a_last_pth_of_another_run(run_copy, capsys):
    """A last.pth copied from a longer run (epoch 6 of MAX_EPOCHS 6) into this one (MAX_EPOCHS 2)."""
    state = load_file(str(run_copy / "last.pth"))
    state["epoch"] = 6
    state["config"] = state["config"].replace("MAX_EPOCHS: 2", "MAX_EPOCHS: 6")
    torch.save(state, run_copy / "last.pth")
    before = snapshot(run_copy)
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy)]) == 2
    one_line_error(capsys, run_copy / "last.pth", "SOLVER.STAGE2.MAX_EPOCHS", "6", "2")
    assert snapshot(run_copy) == before          # results.json is not replaced
    # the same position with this run's config: the position alone is refused
    state["config"] = state["config"].replace("MAX_EPOCHS: 6", "MAX_EPOCHS: 2")
    torch.save(state, run_copy / "last.pth")
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy)]) == 2
    one_line_error(capsys, run_copy / "last.pth", "epoch 6", "SOLVER.STAGE2.MAX_EPOCHS 2")


@pytest.mark.parametrize("key,old,new", [("MAX_EPOCHS: 2", "SOLVER.STAGE2.MAX_EPOCHS", "MAX_EPOCHS: 3"),
                                         ("BASE_LR: 0.0005", "SOLVER.STAGE2.BASE_LR", "BASE_LR: 0.0001")])
def test_resume_refuses_a_hand_edited_config_yaml(run_copy, key, old, new, capsys):
    cfg_path = run_copy / "config.yaml"
    text = cfg_path.read_text()
    stage2 = text.index("STAGE2:")            # edit the stage-2 value only
    cfg_path.write_text(text[:stage2] + text[stage2:].replace(key, new, 1))
    before = snapshot(run_copy)
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy)]) == 2
    one_line_error(capsys, run_copy / "last.pth", old, "config.yaml")
    assert snapshot(run_copy) == before


def test_resume_of_a_missing_folder_fails_at_once(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(missing)]) == 2
    one_line_error(capsys, missing, "does not exist")
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(empty)]) == 2
    one_line_error(capsys, empty, "no run to continue")
    assert os.listdir(empty) == []


# ----------------------------------------------------------------------------- files that do not fit
def test_cut_files_are_named(finished_run, run_copy, tiny_root, tmp_path, capsys):
    """A checkpoint cut to 5 kB gave '[Errno 22] Invalid argument' without the file."""
    cut = tmp_path / "cut.pth"
    cut.write_bytes((finished_run / "ViT-B-16_2.pth").read_bytes()[:5000])
    assert _eval(tiny_root, cut, tmp_path / "eval") == 2
    one_line_error(capsys, cut, "damaged")
    (run_copy / "last.pth").write_bytes((finished_run / "last.pth").read_bytes()[:5000])
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy)]) == 2
    one_line_error(capsys, run_copy / "last.pth", "damaged")


def _rn50_model():
    cfg = load_config(CNN_DEMO, TINY)
    return cfg, make_model(cfg, num_class=8, camera_num=2, view_num=1)


def test_rn50_last_pth_in_a_vit_run_is_named(run_copy, capsys):
    cfg, model = _rn50_model()
    capsys.readouterr()
    state = load_file(str(run_copy / "last.pth"))
    state["model"] = model.state_dict()
    state["config"] = cfg.dump()
    torch.save(state, run_copy / "last.pth")
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy)]) == 2
    one_line_error(capsys, run_copy / "last.pth", "MODEL.NAME", "RN50")
    # weights alone that do not fit (config equal): the error names the file too
    vit_cfg = load_config(DEMO, TINY)
    vit = make_model(vit_cfg, num_class=8, camera_num=2, view_num=1)
    capsys.readouterr()
    with pytest.raises(CheckpointMismatchError, match="/x/last.pth does not fit"):
        restore_train_state({"model": model.state_dict(), "source": "/x/last.pth"}, vit, None, None, None)


def test_rn50_metadata_beside_vit_weights_is_named(finished_run, tiny_root, tmp_path, capsys):
    weight = tmp_path / "ViT-B-16_2.pth"
    shutil.copy(finished_run / "ViT-B-16_2.pth", weight)
    meta = json.loads((finished_run / "ViT-B-16_2.json").read_text())
    meta.update(model="RN50", sie_camera=False, camera_num=1)
    (tmp_path / "ViT-B-16_2.json").write_text(json.dumps(meta))
    assert _eval(tiny_root, weight, tmp_path / "eval") == 2
    one_line_error(capsys, tmp_path / "ViT-B-16_2.json", "RN50", "ViT-B-16")
