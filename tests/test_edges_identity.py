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
from processor.train_state import restore_train_state
from tests.helpers import DEMO, TINY, one_line_error, paren_depth, snapshot, synthetic_set, train_argv
from utils.checkpoint import CheckpointMismatchError, load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN_DEMO = os.path.join(ROOT, "configs/demo/cnn_svllreid_demo.yml")




def _eval(root, weight, out, *extra):
    return test_svllreid.main(["--config_file", DEMO, "DATASETS.ROOT_DIR", str(root), *TINY,
                               "TEST.WEIGHT", str(weight), "OUTPUT_DIR", str(out), *extra])


# ----------------------------------------------------------------------------- --resume checks last.pth
@pytest.mark.slow
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


@pytest.mark.slow
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


def test_the_content_identity_changes_with_an_image_under_the_same_name(tmp_path):
    from datasets import build_dataset
    from datasets.bases import dataset_change, dataset_identity
    root = synthetic_set(tmp_path / "data")
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    before = dataset_identity(build_dataset("folder", root), content=True)
    assert before == dataset_identity(build_dataset("folder", str(moved)), content=True)   # where: not identity
    assert "content" not in dataset_identity(build_dataset("folder", root))
    first = sorted(os.listdir(moved / "bounding_box_train"))[0]
    shutil.copy(moved / "bounding_box_train" / sorted(os.listdir(moved / "bounding_box_train"))[-1],
                moved / "bounding_box_train" / first)      # another picture under the same name
    after = dataset_identity(build_dataset("folder", str(moved)), content=True)
    assert after["fingerprint"] == before["fingerprint"] and after["train_pids"] == before["train_pids"]
    assert dataset_change(before, after) == "other image files or contents"


@pytest.mark.slow
def test_resume_on_regenerated_data_is_refused(run_copy, tiny_root, tmp_path, capsys):
    """Data regenerated at the same path before --resume: the run carried on with the new data."""
    same = tmp_path / "same"
    shutil.copytree(tiny_root, same)
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy), "DATASETS.ROOT_DIR", str(same)]) == 0
    regenerated = tmp_path / "regenerated"
    synthetic_set(regenerated, seed=4)            # the same spec, other pictures (and other file names)
    replaced = tmp_path / "replaced"
    shutil.copytree(tiny_root, replaced)
    names = sorted(os.listdir(replaced / "bounding_box_train"))
    shutil.copy(replaced / "bounding_box_train" / names[-1], replaced / "bounding_box_train" / names[0])
    state = load_file(str(run_copy / "last.pth"))
    assert state["data_identity"]["content"]
    for data, said in ((regenerated, "other query/gallery files"), (replaced, "other image files or contents")):
        before = snapshot(run_copy)
        assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy), "DATASETS.ROOT_DIR", str(data)]) == 2
        one_line_error(capsys, run_copy / "last.pth", said, "--overwrite")
        assert {k: v for k, v in snapshot(run_copy).items() if k != "train_log.txt"} == \
            {k: v for k, v in before.items() if k != "train_log.txt"}
    # a last.pth of an older version (no identity in it): the identity in the weights' metadata is used
    del state["data_identity"]
    torch.save(state, run_copy / "last.pth")
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(run_copy), "DATASETS.ROOT_DIR", str(replaced)]) == 2
    one_line_error(capsys, run_copy / "last.pth", "other image files or contents")


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


def _run_files(out, tiny_root, *names):
    """A run folder as training leaves it: the tiny run's config.yaml and the files ``names`` (dummies)."""
    from tests.helpers import tiny_cfg
    from utils.run_dir import save_run_config
    cfg = tiny_cfg(tiny_root, out)
    save_run_config(str(out), cfg)
    for n in names:
        (out / n).write_text("{}" if n.endswith(".json") else "x")
    return cfg


def test_resume_of_a_finished_run_without_last_pth_is_refused(tiny_root, tmp_path, capsys):
    """last.pth deleted to save space: --resume retrained in place over results.json and the weights."""
    out = tmp_path / "run"
    out.mkdir()
    _run_files(out, tiny_root, "results.json", "ViT-B-16_2.pth", "ViT-B-16_2.json", "train_log.txt")
    before = snapshot(out)
    assert train_svllreid.main(["--resume", "OUTPUT_DIR", str(out)]) == 2
    one_line_error(capsys, out, "finished run", "results.json", "last.pth", "--overwrite")
    assert snapshot(out) == before and not any(n.startswith("previous-") for n in os.listdir(out))


def test_resume_of_an_unfinished_run_without_last_pth_moves_its_files_aside(tiny_root, tmp_path):
    """A run stopped between its first weights file and its first last.pth: nothing to continue, so its
    files go to previous-<time>/ (nothing is overwritten) and it starts over with its own config."""
    from utils.run_dir import prepare_output_dir
    out = tmp_path / "run"
    out.mkdir()
    _run_files(out, tiny_root, "ViT-B-16_stage1_1.pth", "ViT-B-16_stage1_1.json", "train_log.txt")
    notes = prepare_output_dir(str(out), resume=True, overwrite=False)
    moved = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(moved) == 1 and len(notes) == 1 and moved[0] in notes[0] and "from scratch" in notes[0]
    assert sorted(os.listdir(out / moved[0])) == ["ViT-B-16_stage1_1.json", "ViT-B-16_stage1_1.pth", "train_log.txt"]
    assert sorted(os.listdir(out)) == sorted(["config.yaml", moved[0]])


def test_resume_without_config_yaml_blames_the_missing_file(tiny_root, tmp_path, capsys):
    """config.yaml deleted: the error blamed last.pth ("does not belong to this run")."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = _run_files(out, tiny_root)
    torch.save({"stage": 2, "epoch": 1, "model": {}, "optimizer": {}, "config": cfg.dump()}, out / "last.pth")
    os.remove(out / "config.yaml")
    assert train_svllreid.main(["--resume", "--config_file", DEMO, "OUTPUT_DIR", str(out)]) == 2
    err = one_line_error(capsys, out / "config.yaml", "is missing", "INPUT.SIZE_TRAIN")
    assert "does not belong" not in err


# ----------------------------------------------------------------------------- files that do not fit
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_rn50_metadata_beside_vit_weights_is_named(finished_run, tiny_root, tmp_path, capsys):
    weight = tmp_path / "ViT-B-16_2.pth"
    shutil.copy(finished_run / "ViT-B-16_2.pth", weight)
    meta = json.loads((finished_run / "ViT-B-16_2.json").read_text())
    meta.update(model="RN50", sie_camera=False, camera_num=1)
    (tmp_path / "ViT-B-16_2.json").write_text(json.dumps(meta))
    assert _eval(tiny_root, weight, tmp_path / "eval") == 2
    one_line_error(capsys, tmp_path / "ViT-B-16_2.json", "RN50", "ViT-B-16")


# ----------------------------------------------------------------------------- metadata tied to its weights
def _saved_weights(folder, tiny_root, seed, *opts):
    """A tiny demo model (random weights from ``seed``) saved by the training's save_weights, with
    its metadata; returns (config whose TEST.WEIGHT is the file, path)."""
    from processor.train_state import save_weights
    from tests.helpers import TOOL_SIZE
    os.makedirs(folder, exist_ok=True)
    weight = os.path.join(folder, "ViT-B-16_2.pth")
    cfg = load_config(DEMO, ["DATASETS.ROOT_DIR", str(tiny_root), *TOOL_SIZE, *opts, "TEST.WEIGHT", weight])
    torch.manual_seed(seed)
    save_weights(str(folder), "ViT-B-16_2.pth", make_model(cfg, num_class=8, camera_num=2, view_num=1), cfg, 2, 2)
    return cfg, weight


def test_metadata_of_other_weights_is_refused_by_their_hash(tiny_root, tmp_path, capsys):
    """The metadata JSON names the SHA-256 of its weights: another run's JSON (other camera
    numbering, another feature width) beside these weights is refused in one line, naming it."""
    from model.loading import load_for_inference
    from utils.checkpoint import WEIGHTS_HASH_KEY, file_sha256
    cfg, weight = _saved_weights(tmp_path / "a", tiny_root, 0)
    meta = json.loads((tmp_path / "a" / "ViT-B-16_2.json").read_text())
    assert meta[WEIGHTS_HASH_KEY] == file_sha256(weight)             # computed while writing: the file's hash
    load_for_inference(cfg)                                          # its own metadata: fine
    # same shapes, other weights (another run), its camera numbering swapped
    _saved_weights(tmp_path / "b", tiny_root, 1)
    other = json.loads((tmp_path / "b" / "ViT-B-16_2.json").read_text())
    other["dataset_identity"] = {"camera_numbers": {"1": 1, "2": 0}}
    (tmp_path / "a" / "ViT-B-16_2.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointMismatchError, match=WEIGHTS_HASH_KEY):
        load_for_inference(cfg)
    assert _eval(tiny_root, weight, tmp_path / "eval") == 2
    one_line_error(capsys, tmp_path / "a" / "ViT-B-16_2.json", weight, "other weights")
    # a 96-d model's metadata beside 128-d weights
    _saved_weights(tmp_path / "c", tiny_root, 0, "MODEL.CLIP_ARCH.VISION_WIDTH", "32")
    narrow = json.loads((tmp_path / "c" / "ViT-B-16_2.json").read_text())
    assert narrow["feat_dim"] != meta["feat_dim"]
    (tmp_path / "a" / "ViT-B-16_2.json").write_text(json.dumps(narrow))
    with pytest.raises(CheckpointMismatchError, match="other weights"):
        load_for_inference(cfg)
    # the same without the hash (as an older version wrote it): the feature width still tells
    del narrow[WEIGHTS_HASH_KEY]
    (tmp_path / "a" / "ViT-B-16_2.json").write_text(json.dumps(narrow))
    with pytest.raises(CheckpointMismatchError, match=f"feat_dim {narrow['feat_dim']}"):
        load_for_inference(cfg)


def test_metadata_without_the_hash_loads_with_one_warning(tiny_root, tmp_path, caplog):
    from model.loading import load_for_inference
    from utils.checkpoint import WEIGHTS_HASH_KEY, read_metadata
    cfg, weight = _saved_weights(tmp_path, tiny_root, 0)
    meta = json.loads((tmp_path / "ViT-B-16_2.json").read_text())
    del meta[WEIGHTS_HASH_KEY]
    (tmp_path / "ViT-B-16_2.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="svllreid"):
        _, info = load_for_inference(cfg)
        read_metadata(weight)
    assert info["metadata"]["camera_num"] == 2 and info["camera_num"] == 2
    warned = [r.getMessage() for r in caplog.records if WEIGHTS_HASH_KEY in r.getMessage()]
    assert len(warned) == 1 and "older version" in warned[0] and str(tmp_path / "ViT-B-16_2.json") in warned[0]


@pytest.mark.parametrize("key,value", [("camera_num", "two"), ("sie_camera", "yes"), ("num_classes", 0),
                                       ("feat_dim", [96]), ("camera_num", None)])
def test_metadata_of_a_wrong_type_is_one_line(tiny_root, tmp_path, capsys, key, value):
    """camera_num: "two" gave a ValueError traceback in check_metadata."""
    _, weight = _saved_weights(tmp_path / "w", tiny_root, 0)
    path = tmp_path / "w" / "ViT-B-16_2.json"
    meta = json.loads(path.read_text())
    meta[key] = value
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert _eval(tiny_root, weight, tmp_path / "eval") == 2
    one_line_error(capsys, path, key, repr(value))


# ----------------------------------------------------------------------------- SIE: what the data is, not where
def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def own_eval(finished_run, tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("own_eval")
    assert _eval(tiny_root, finished_run / "ViT-B-16_2.pth", out) == 0
    return _results(out)


@pytest.mark.slow
def test_moved_data_keeps_the_camera_embedding(finished_run, own_eval, tiny_root, tmp_path, capsys):
    """A byte-identical copy of the data elsewhere is the same dataset: same SIE decision, same mAP."""
    assert own_eval["use_sie"] is True
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(tiny_root, moved)
    assert _eval(moved, finished_run / "ViT-B-16_2.pth", tmp_path / "e") == 0
    res = _results(tmp_path / "e")
    assert res["use_sie"] is True and "wherever it lies" in res["sie_reason"]
    assert res["mAP"] == pytest.approx(own_eval["mAP"], abs=1e-6)


@pytest.mark.slow
def test_moved_project_keeps_the_camera_embedding(finished_run, own_eval, tiny_root, tmp_path):
    """A moved clone: the checkpoint (with its metadata) is somewhere else, the data too."""
    run = tmp_path / "clone" / "output"
    shutil.copytree(finished_run, run)
    data = tmp_path / "clone" / "data"
    shutil.copytree(tiny_root, data)
    assert _eval(data, run / "ViT-B-16_2.pth", tmp_path / "e") == 0
    assert _results(tmp_path / "e")["use_sie"] is True
    assert _results(tmp_path / "e")["mAP"] == pytest.approx(own_eval["mAP"], abs=1e-6)


@pytest.mark.slow
def test_another_folder_dataset_is_cross_dataset(finished_run, tmp_path):
    other = tmp_path / "other"
    synthetic_set(other, seed=11)
    assert _eval(other, finished_run / "ViT-B-16_2.pth", tmp_path / "e") == 0
    res = _results(tmp_path / "e")
    assert res["use_sie"] is False and "fingerprint" in res["sie_reason"]


@pytest.mark.slow
def test_metadata_of_an_older_version_gets_a_logged_decision(finished_run, own_eval, tiny_root, tmp_path, capsys):
    weight = tmp_path / "ViT-B-16_2.pth"
    shutil.copy(finished_run / "ViT-B-16_2.pth", weight)
    meta = json.loads((finished_run / "ViT-B-16_2.json").read_text())
    del meta["dataset_identity"]
    (tmp_path / "ViT-B-16_2.json").write_text(json.dumps(meta))
    moved = tmp_path / "moved"
    shutil.copytree(tiny_root, moved)
    capsys.readouterr()
    assert _eval(moved, weight, tmp_path / "e") == 0
    res = _results(tmp_path / "e")
    assert res["use_sie"] is True and "older version" in res["sie_reason"]
    assert res["mAP"] == pytest.approx(own_eval["mAP"], abs=1e-6)
    logged = [ln for ln in capsys.readouterr().out.splitlines() if "SIE at test time" in ln]
    assert logged and "older version" in logged[0]              # the decision is in the log
    assert paren_depth(logged[0]) <= 1, logged[0]               # said flat, not "(... (... (...)))"


@pytest.mark.slow
def test_tools_and_evaluation_take_the_same_decision(finished_run, tiny_root):
    """One function decides: a config naming another dataset turns SIE off in the tools too."""
    from retrieval.features import load_model
    weight = str(finished_run / "ViT-B-16_2.pth")
    _, info = load_model(load_config(DEMO, [*TINY, "TEST.WEIGHT", weight]))
    assert info["use_sie"] is True and info["sie_camera"] is True
    _, info = load_model(load_config(DEMO, [*TINY, "TEST.WEIGHT", weight, "DATASETS.NAMES", "market1501"]))
    assert info["use_sie"] is False and info["sie_camera"] is False and "cross-dataset" in info["sie_reason"]


# ----------------------------------------------------------------------------- one camera numbering
def _renumber(root, mapping):
    """Rename every image's camera cN to c<mapping[N]> (gapped camera numbers)."""
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        for name in os.listdir(root / sub) if (root / sub).is_dir() else []:
            pid, rest = name.split("_c", 1)
            n = int(rest[0])
            os.rename(root / sub / name, root / sub / f"{pid}_c{mapping[n]}{rest[1:]}")


@pytest.fixture(scope="module")
def gapped_run(tiny_root, tmp_path_factory):
    """A tiny run on data whose cameras are c3 and c7."""
    data = tmp_path_factory.mktemp("gapped") / "data"
    shutil.copytree(tiny_root, data)
    _renumber(data, {1: 3, 2: 7})
    out = tmp_path_factory.mktemp("gapped_run")
    assert train_svllreid.main(train_argv(data, out)) == 0
    return data, out


@pytest.mark.slow
def test_checkpoint_metadata_holds_the_camera_numbering(gapped_run):
    data, out = gapped_run
    ident = json.loads((out / "ViT-B-16_2.json").read_text())["dataset_identity"]
    assert ident["camera_numbers"] == {"3": 0, "7": 1} and ident["name"] == "folder"
    assert len(ident["train_pids"]) == 8 and ident["fingerprint"]


@pytest.mark.slow
def test_tools_number_cameras_as_the_training_set(gapped_run, tmp_path, capsys):
    """The tools gave c3 -> row 2 and c7 -> unknown where the datasets give 0 and 1."""
    from datasets.make_dataloader import build_dataset_from_cfg, make_val_loader
    from processor.inference import extract_features
    from retrieval.features import FeatureSet, load_model
    from tools import extract_features as extract_tool
    data, out = gapped_run
    weight = str(out / "ViT-B-16_2.pth")
    cfg = load_config(DEMO, [*TINY, "DATASETS.ROOT_DIR", str(data), "TEST.WEIGHT", weight])
    model, _ = load_model(cfg)
    dataset = build_dataset_from_cfg(cfg, test_only=True)
    loader, _ = make_val_loader(cfg, dataset)
    feats, _, camids = extract_features(cfg, model, loader, torch.device("cpu"))
    want = {os.path.basename(s[0]): (feats[i].numpy(), s[2]) for i, s in enumerate(dataset.query + dataset.gallery)}
    assert set(camids.tolist()) == {0, 1}
    npz = tmp_path / "q.npz"
    assert extract_tool.main(["--config_file", DEMO, "--images", str(data / "query"), "--out", str(npz), *TINY,
                              "DATASETS.ROOT_DIR", str(data), "TEST.WEIGHT", weight]) == 0
    fs = FeatureSet.load(str(npz))
    for i, p in enumerate(fs.paths):
        f, cam = want[os.path.basename(p)]
        assert fs.camids[i] == cam, p
        assert abs(fs.features[i] - f).max() <= 1e-5, p
    assert fs.meta["camera_numbers"] == {"3": 0, "7": 1}
    # a camera the model never saw: warned, no embedding; --camera of an unseen camera: refused
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(data / "query" / fs.paths[0], odd / "0005_c5s1_000001_00.jpg")
    capsys.readouterr()
    assert extract_tool.main(["--config_file", DEMO, "--images", str(odd), "--out", str(tmp_path / "o.npz"), *TINY,
                              "TEST.WEIGHT", weight]) == 0
    out_text = capsys.readouterr().out
    assert "camera beyond the model's 2 trained cameras (c3, c7" in out_text
    assert FeatureSet.load(str(tmp_path / "o.npz")).camids.tolist() == [-1]
    assert extract_tool.main(["--config_file", DEMO, "--images", str(odd), "--out", str(tmp_path / "o.npz"),
                              "--camera", "5", *TINY, "TEST.WEIGHT", weight]) == 2
    one_line_error(capsys, "--camera 5", "c3, c7")


@pytest.mark.slow
def test_test_only_folder_is_numbered_as_training(gapped_run, tmp_path):
    """Query/gallery alone (no training split) with cameras c7 and c9 of a training set c3, c7, c9."""
    from datasets.bases import renumber_cameras
    from datasets.folder import FolderDataset
    data, _ = gapped_run
    test_only = tmp_path / "t"
    for sub in ("query", "bounding_box_test"):
        shutil.copytree(data / sub, test_only / sub)
    _renumber(test_only, {3: 7, 7: 9})           # only the training set's 2nd and 3rd cameras
    ds = FolderDataset(str(test_only), test_only=True)
    assert ds.camera_numbers == {7: 0, 9: 1}
    assert renumber_cameras(ds, {3: 0, 7: 1, 9: 2})
    assert ds.camera_numbers == {7: 1, 9: 2} and {s[2] for s in ds.query + ds.gallery} == {1, 2}
    assert not renumber_cameras(ds, {3: 0, 7: 1, 9: 2})        # already numbered so
    assert not renumber_cameras(ds, {3: 0})                   # an unknown camera: left as it is


# ----------------------------------------------------------------------------- newcomer friction
@pytest.mark.slow
def test_divergence_advice_is_one_that_works(tiny_root, tmp_path, monkeypatch, capsys):
    import processor.processor_stage2 as stage2_mod
    out = tmp_path / "out"
    original = stage2_mod.stage2_forward_loss

    def nan(cfg, *a, **k):
        loss, parts, o = original(cfg, *a, **k)
        return loss * float("nan"), parts, o

    monkeypatch.setattr(stage2_mod, "stage2_forward_loss", nan)
    assert train_svllreid.main(train_argv(tiny_root, out)) == 2
    err = one_line_error(capsys, "SOLVER.STAGE2.BASE_LR", "--overwrite", "last.pth keeps", "end of stage 1 epoch 1")
    assert "resume" not in err
    # the advice is accepted: a new start with a lower rate in the same folder
    monkeypatch.setattr(train_svllreid, "do_train_stage1", _raise(KeyboardInterrupt))
    assert train_svllreid.main(train_argv(tiny_root, out, "SOLVER.STAGE2.BASE_LR", "0.0001", "--overwrite")) == 130
    # before any state was saved the message does not promise one
    from processor.position import POSITION, NonFiniteLossError, check_finite_loss
    monkeypatch.setattr(POSITION, "saved", None)
    with pytest.raises(NonFiniteLossError) as e:
        check_finite_loss({"loss": float("nan")}, 1, 1, 1)
    assert "last.pth keeps" not in str(e.value) and "no training state had been saved" in str(e.value)


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def test_a_run_that_failed_before_training_does_not_block_the_rerun(tiny_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert train_svllreid.main(train_argv(tmp_path / "no_data", out)) == 2
    one_line_error(capsys, "no_data")
    assert (out / "config.yaml").exists()
    monkeypatch.setattr(train_svllreid, "do_train_stage1", _raise(KeyboardInterrupt))
    assert train_svllreid.main(train_argv(tiny_root, out)) == 130      # started, not "already holds a run"
    moved = [d for d in os.listdir(out) if d.startswith("previous-")]
    assert len(moved) == 1 and "config.yaml" in os.listdir(out / moved[0])
    assert f"ROOT_DIR: {tiny_root}" in (out / "config.yaml").read_text()


def _extract(images, out, *opts):
    from tools import extract_features as extract_tool
    return extract_tool.main(["--config_file", DEMO, "--images", str(images), "--out", str(out), *opts])


@pytest.mark.slow
def test_tools_take_the_input_size_from_the_checkpoint(finished_run, tiny_root, tmp_path, capsys):
    """DEMO says 128x64; the run was trained at 64x32 (TINY): the tools need not be told."""
    from retrieval.features import FeatureSet
    weight = str(finished_run / "ViT-B-16_2.pth")
    assert _extract(os.path.join(tiny_root, "query"), tmp_path / "a.npz", *TINY, "TEST.WEIGHT", weight) == 0
    assert _extract(os.path.join(tiny_root, "query"), tmp_path / "b.npz", "DATALOADER.NUM_WORKERS", "0",
                    "TEST.WEIGHT", weight) == 0
    text = capsys.readouterr().out
    assert "From the checkpoint's metadata" in text and "INPUT.SIZE_TEST [64, 32]" in text
    a, b = FeatureSet.load(str(tmp_path / "a.npz")), FeatureSet.load(str(tmp_path / "b.npz"))
    assert b.meta["size_test"] == [64, 32] and abs(a.features - b.features).max() <= 1e-6
    # an explicit override still wins
    assert _extract(os.path.join(tiny_root, "query"), tmp_path / "c.npz", "DATALOADER.NUM_WORKERS", "0",
                    "INPUT.PIXEL_MEAN", "[0.2, 0.2, 0.2]", "TEST.WEIGHT", weight) == 0
    assert "INPUT.PIXEL_MEAN" not in capsys.readouterr().out
    assert abs(FeatureSet.load(str(tmp_path / "c.npz")).features - a.features).max() > 1e-3


@pytest.mark.slow
def test_extract_features_log_says_what_it_knows_once(finished_run, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (32, 64), (120, 30, 200)).save(folder / "0001_c1_x.jpg")
    capsys.readouterr()
    assert _extract(folder, tmp_path / "f.npz", *TINY, "TEST.WEIGHT", str(finished_run / "ViT-B-16_2.pth")) == 0
    text = capsys.readouterr().out
    assert text.count("Loaded ") == 1, text
    assert "the test set is the checkpoint's training dataset" not in text
    assert "SIE at test time: used; images named by camera number" in text


@pytest.mark.slow
def test_train_identities_in_the_test_split_are_warned(finished_run, tiny_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    train = sorted(os.listdir(data / "bounding_box_train"))
    for name in train[:2] + train[-1:]:            # identities 0394 (two images) and 8688
        shutil.copy(data / "bounding_box_train" / name, data / "bounding_box_test" / name)
    capsys.readouterr()
    assert _eval(data, finished_run / "ViT-B-16_2.pth", tmp_path / "e") == 0
    text = capsys.readouterr().out
    warned = [line for line in text.splitlines() if "are training identities" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and " 2 query/gallery identities" in warned[0]
    from datasets import make_dataloader
    make_dataloader(load_config(DEMO, [*TINY, "DATASETS.ROOT_DIR", str(data)]))
    assert " 2 query/gallery identities are training identities of its own training split" in capsys.readouterr().out
    assert _eval(tiny_root, finished_run / "ViT-B-16_2.pth", tmp_path / "e2") == 0
    assert "are training identities" not in capsys.readouterr().out       # distractors / junk are not counted


@pytest.mark.slow
def test_onnx_metadata_carries_the_camera_numbering(gapped_run):
    from model import load_for_inference
    from retrieval.export import metadata
    data, out = gapped_run
    cfg = load_config(DEMO, [*TINY, "DATASETS.ROOT_DIR", str(data), "TEST.WEIGHT", str(out / "ViT-B-16_2.pth")])
    model, info = load_for_inference(cfg)
    props = metadata(cfg, model, info, 18)
    assert props["sie_inputs"] == "camid" and props["sie_camera_numbers"] == "3:0,7:1"
