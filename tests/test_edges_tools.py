"""Edges of the tools (search, evaluation folder, ONNX export, curves): each case is refused with one
line naming the culprit, or gives the right result; nothing stale or mixed is left behind."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

import test_svllreid
import train_svllreid
from config import load_config
from tests.helpers import DEMO, lock_held_elsewhere, one_line_error, paren_depth, tool_opts
from tools import extract_features as extract_tool
from tools import search as search_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _search(tiny_root, weight, query, gallery, out, *flags):
    """The search tool with its flags after the KEY VALUE overrides (accepted anywhere)."""
    return search_tool.main(["--config_file", DEMO, "--query", str(query), "--gallery", str(gallery),
                             *tool_opts(tiny_root, weight), "--out", str(out), *flags])


# ----------------------------------------------------------------------------- flags anywhere
def test_flags_are_accepted_after_the_overrides_by_every_script():
    from tools import export_onnx
    argv = ["--query", "q", "--gallery", "g", "TEST.WEIGHT", "w", "--out", "o", "SOLVER.STAGE2.BASE_LR", "-0.5",
            "--no_pictures", "--topk", "3"]
    a = search_tool.parse_args(argv)
    assert (a.out, a.no_pictures, a.topk) == ("o", True, 3)
    assert a.opts == ["TEST.WEIGHT", "w", "SOLVER.STAGE2.BASE_LR", "-0.5"]     # a negative value stays a value
    a = extract_tool.parse_args(["TEST.WEIGHT", "w", "--images", "i", "--out=x.npz", "--camera", "2"])
    assert (a.images, a.out, a.camera, a.opts) == ("i", "x.npz", 2, ["TEST.WEIGHT", "w"])
    a = export_onnx.parse_args(["TEST.WEIGHT", "w", "--out", "m.onnx", "--images", "a", "--images", "b",
                                "--opset", "17"])
    assert (a.out, a.images, a.opset, a.opts) == ("m.onnx", ["a", "b"], 17, ["TEST.WEIGHT", "w"])
    a = test_svllreid.parse_args(["TEST.WEIGHT", "w", "--config_file", "c.yml"])
    assert (a.config_file, a.opts) == ("c.yml", ["TEST.WEIGHT", "w"])
    a = train_svllreid.parse_args(["OUTPUT_DIR", "o", "--resume", "MODEL.DEVICE", "cpu"])
    assert a.resume and a.opts == ["OUTPUT_DIR", "o", "MODEL.DEVICE", "cpu"]
    with pytest.raises(SystemExit):          # an unknown flag is still refused, wherever it stands
        search_tool.parse_args(["--query", "q", "--gallery", "g", "--out", "o", "TEST.WEIGHT", "w", "--bogus"])


# ----------------------------------------------------------------------------- search



def _rewrite(src, dst, **changes):
    """A copy of the .npz ``src`` with some arrays replaced."""
    z = dict(np.load(src))
    z.update(changes)
    np.savez(dst, **z)
    return dst


def test_search_refuses_non_finite_features(tiny_root, weight, gallery_npz, tmp_path, capsys):
    feats = np.load(gallery_npz)["features"].copy()
    feats[3, 0] = np.nan
    feats[5, :] = np.inf
    bad = _rewrite(gallery_npz, tmp_path / "nan.npz", features=feats)
    q = os.path.join(tiny_root, "query")
    assert _search(tiny_root, weight, q, bad, tmp_path / "out", "--no_pictures") == 2
    one_line_error(capsys, bad, "2 of", "NaN/Inf")
    assert not os.path.exists(tmp_path / "out" / "results.json")
    # a model whose weights are not finite: the folder's features are refused as evaluation refuses them
    sd = torch.load(weight)
    sd[next(k for k in sd if k.startswith("image_encoder.") and sd[k].is_floating_point())].fill_(float("nan"))
    torch.save(sd, tmp_path / "nan.pth")
    assert _search(tiny_root, str(tmp_path / "nan.pth"), q, os.path.join(tiny_root, "bounding_box_test"),
                   tmp_path / "out2", "--no_pictures") == 2
    one_line_error(capsys, "gallery", "NaN/Inf", "features")


@pytest.mark.parametrize("case,needles", [
    ("empty", ["holds no features", "0 images"]),
    ("short_pids", ["'pids'", "one integer per feature"]),
    ("text_camids", ["'camids'", "one integer per feature"]),
    ("meta_not_json", ["'meta'", "not valid JSON"]),
    ("meta_list", ["'meta'", "expected an object"]),
    ("failed_mismatch", ["'failed'", "failed_reasons"]),
])
def test_search_refuses_broken_feature_files(tiny_root, weight, gallery_npz, tmp_path, capsys, case, needles):
    z = np.load(gallery_npz)
    n = len(z["paths"])
    changes = {"empty": dict(features=np.zeros((0, z["features"].shape[1]), np.float32),
                             paths=np.array([], dtype=str), pids=np.zeros(0, np.int64), camids=np.zeros(0, np.int64)),
               "short_pids": dict(pids=z["pids"][:n - 2]),
               "text_camids": dict(camids=np.array(["c1"] * n)),
               "meta_not_json": dict(meta=np.array("{'weight': oops")),
               "meta_list": dict(meta=np.array("[1, 2]")),
               "failed_mismatch": dict(failed=np.array(["a.jpg", "b.jpg"]), failed_reasons=np.array(["x"]))}[case]
    bad = _rewrite(gallery_npz, tmp_path / f"{case}.npz", **changes)
    assert _search(tiny_root, weight, os.path.join(tiny_root, "query"), bad, tmp_path / "out") == 2
    one_line_error(capsys, bad, *needles)


def test_search_leaves_junk_out_as_evaluation_does(tiny_root, weight, gallery_npz, tmp_path):
    from datasets.make_dataloader import build_dataset_from_cfg
    cfg = load_config(DEMO, tool_opts(tiny_root, weight))
    evaluated = {os.path.basename(s[0]) for s in build_dataset_from_cfg(cfg, test_only=True).gallery}
    files = os.listdir(os.path.join(tiny_root, "bounding_box_test"))
    assert any(f.startswith("-1_") for f in files)          # the set has junk, which evaluation leaves out
    for gallery in (os.path.join(tiny_root, "bounding_box_test"), gallery_npz):
        out = tmp_path / os.path.basename(str(gallery))
        assert _search(tiny_root, weight, os.path.join(tiny_root, "query"), gallery, out, "--no_pictures",
                       "--topk", "100") == 0
        res = json.loads((out / "results.json").read_text())
        assert res["num_gallery"] == len(evaluated) and res["junk_left_out"] == len(files) - len(evaluated)
        for q in res["queries"]:
            assert {os.path.basename(h["path"]) for h in q["results"]} == evaluated


@pytest.mark.slow
def test_search_folder_is_locked_and_a_rerun_replaces_the_pictures(tiny_root, weight, gallery_npz, tmp_path, capsys):
    out = tmp_path / "out"
    qdir = os.path.join(tiny_root, "query")
    assert _search(tiny_root, weight, qdir, gallery_npz, out, "--topk", "3") == 0
    first = json.loads((out / "results.json").read_text())
    assert sorted(os.listdir(out / "ranked")) == sorted(os.path.basename(q["picture"]) for q in first["queries"])
    assert len(first["queries"]) > 1
    # a second search on the same folder while one runs: refused at once, the first run's files untouched
    with lock_held_elsewhere(out) as holder:
        assert _search(tiny_root, weight, qdir, gallery_npz, out, "--topk", "2") == 2
        one_line_error(capsys, "--out", out, f"pid {holder.pid}", "in use")
    assert json.loads((out / "results.json").read_text()) == first
    # a re-run with one query: ranked/ holds exactly this run's picture, none of the previous run's
    one = os.path.join(qdir, sorted(os.listdir(qdir))[0])
    assert _search(tiny_root, weight, one, gallery_npz, out, "--topk", "2") == 0
    second = json.loads((out / "results.json").read_text())
    assert [os.path.basename(q["picture"]) for q in second["queries"]] == os.listdir(out / "ranked")
    assert len(os.listdir(out / "ranked")) == 1
    # --no_pictures: results.json alone, no pictures of an earlier run beside it
    assert _search(tiny_root, weight, qdir, gallery_npz, out, "--no_pictures") == 0
    assert not os.path.exists(out / "ranked")
    assert not [n for n in os.listdir(out) if n.startswith(".svllreid-partial")]


def test_search_on_a_feature_file_whose_images_are_gone(tiny_root, weight, tmp_path, capsys):
    import shutil
    gal = tmp_path / "gallery"
    shutil.copytree(os.path.join(tiny_root, "bounding_box_test"), gal)
    npz = tmp_path / "g.npz"
    assert extract_tool.main(["--config_file", DEMO, "--images", str(gal), "--out", str(npz),
                              *tool_opts(tiny_root, weight)]) == 0
    shutil.rmtree(gal)
    capsys.readouterr()
    q = os.path.join(tiny_root, "query")
    assert _search(tiny_root, weight, q, npz, tmp_path / "out") == 2          # pictures asked: refused
    one_line_error(capsys, npz, gal, "no longer exists", "--no_pictures")
    assert _search(tiny_root, weight, q, npz, tmp_path / "out", "--no_pictures") == 0   # results alone: a warning
    logged = capsys.readouterr().out
    assert logged.count("no longer exists") == 1 and str(gal) in logged


@pytest.mark.slow
def test_search_out_inside_the_gallery_is_never_searched(tiny_root, weight, tmp_path):
    """--out inside the gallery folder, searched twice, then another --out beside it: the gallery
    stays the same images, and no result points into a search's own output."""
    gal = tmp_path / "gallery"
    shutil.copytree(os.path.join(tiny_root, "bounding_box_test"), gal)
    q = os.path.join(tiny_root, "query")
    sizes = []
    for out in (gal / "search", gal / "search", gal / "other"):
        assert _search(tiny_root, weight, q, gal, out, "--topk", "100") == 0
        res = json.loads((out / "results.json").read_text())
        sizes.append(res["num_gallery"])
        for hit in (h for query in res["queries"] for h in query["results"]):
            assert os.path.dirname(hit["path"]) == str(gal), hit["path"]
    assert os.listdir(gal / "search" / "ranked") and sizes[0] == sizes[1] == sizes[2]


def _tree_with_links(tmp_path, tiny_root):
    """An image folder with a linked sub-folder (its images real elsewhere), a second link to the
    same folder, a link back to the top (a loop), a named pipe, a broken link and a text file."""
    src = os.path.join(tiny_root, "bounding_box_test")
    names = sorted(n for n in os.listdir(src) if not n.startswith("-1"))[:3]
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    (elsewhere / "sub").mkdir(parents=True)
    shutil.copy(os.path.join(src, names[0]), root / "a" / names[0])
    shutil.copy(os.path.join(src, names[1]), elsewhere / names[1])
    shutil.copy(os.path.join(src, names[2]), elsewhere / "sub" / names[2])
    os.symlink(elsewhere, root / "b_linked")
    os.symlink(elsewhere, root / "c_again")
    os.symlink(root, root / "a" / "loop")
    os.mkfifo(root / "pipe.jpg")
    os.symlink(tmp_path / "missing.jpg", root / "broken.jpg")
    (root / "notes.txt").write_text("not an image")
    return root, names


def test_linked_folders_are_followed_and_loops_and_pipes_left_out(tiny_root, tmp_path, caplog):
    from retrieval.features import list_image_files
    root, names = _tree_with_links(tmp_path, tiny_root)
    with caplog.at_level(logging.INFO, logger="svllreid"):
        files = list_image_files(str(root))
    assert files == [os.path.join("a", names[0]), os.path.join("b_linked", names[1]),
                     os.path.join("b_linked", "sub", names[2])]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "4 entries left out" in warned[0], warned
    for needle in ("pipe.jpg (a named pipe, not a regular file)", "broken.jpg (a broken link)",
                   "c_again/ (the same folder as b_linked", "a/loop/ (a loop, a link back to .)"):
        assert needle in warned[0], (needle, warned[0])
    assert paren_depth(warned[0]) == 1, warned[0]     # was "(a named pipe (FIFO), ...)", "(... (a loop))"


def test_extraction_reads_linked_folders_and_never_waits_on_a_pipe(tiny_root, weight, tmp_path, capsys):
    root, names = _tree_with_links(tmp_path, tiny_root)
    out = tmp_path / "f.npz"
    assert extract_tool.main(["--config_file", DEMO, "--images", str(root), "--out", str(out),
                              *tool_opts(tiny_root, weight)]) == 0          # would wait forever on the pipe
    z = np.load(out)
    assert sorted(os.path.basename(p) for p in z["paths"]) == sorted(names) and len(z["failed"]) == 0
    assert "4 entries left out" in capsys.readouterr().out


class _Watched(torch.Tensor):
    """Features that note every blocking copy to the host made of them (``.cpu()``, ``.numpy()``
    of a device tensor, ``.to('cpu')`` that waits): on a GPU each one stalls the device."""

    copies: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        blocking = func is torch.Tensor.cpu or (func is torch.Tensor.to and not kwargs.get("non_blocking"))
        if blocking and isinstance(args[0], cls):
            cls.copies.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs)


def test_extraction_copies_no_batch_to_the_host_while_it_runs(tiny_root, weight, gallery_npz, tmp_path, monkeypatch):
    """Each batch's features stay where they were computed (on a GPU: copied to pinned memory
    without a wait) and reach the host once, at the end: the same features as before."""
    from retrieval import features as folder_features
    real = folder_features.encode_batch
    _Watched.copies = []
    monkeypatch.setattr(folder_features, "encode_batch", lambda *a, **k: real(*a, **k).as_subclass(_Watched))
    out = tmp_path / "g.npz"
    assert extract_tool.main(["--config_file", DEMO, "--images", os.path.join(tiny_root, "bounding_box_test"),
                              "--out", str(out), *tool_opts(tiny_root, weight, "TEST.IMS_PER_BATCH", "4")]) == 0
    assert _Watched.copies == []
    assert np.array_equal(np.load(out)["features"], np.load(gallery_npz)["features"])


def test_an_input_size_the_checkpoint_was_not_built_for_is_one_line(tiny_root, weight, tmp_path, capsys):
    """INPUT.SIZE_TEST that gives another patch grid than the model's: one line before any image is read."""
    bad = ["INPUT.SIZE_TEST", "[336, 160]"]
    assert extract_tool.main(["--config_file", DEMO, "--images", os.path.join(tiny_root, "query"), "--out",
                              str(tmp_path / "f.npz"), *tool_opts(tiny_root, weight), *bad]) == 2
    one_line_error(capsys, "INPUT.SIZE_TEST [336, 160]", "27x13 patch grid", "5x2", weight)
    assert test_svllreid.main(["--config_file", DEMO, *tool_opts(tiny_root, weight), *bad]) == 2
    one_line_error(capsys, "INPUT.SIZE_TEST [336, 160]", "27x13 patch grid", "5x2", "INPUT.SIZE_TEST [64, 32]")


# ----------------------------------------------------------------------------- evaluating twice
@pytest.mark.slow
def test_second_evaluation_moves_the_first_aside_and_leaves_no_stale_picture(tiny_root, weight, tmp_path, capsys):
    import shutil
    w = tmp_path / "model.pth"
    shutil.copy(weight, w)
    argv = ["--config_file", DEMO, *tool_opts(tiny_root, str(w)), "TEST.VISUALIZE", "True", "TEST.VISUALIZE_TOPK", "3"]
    assert test_svllreid.main([*argv, "TEST.VISUALIZE_N", "2"]) == 0
    out = tmp_path / "model_eval_folder"             # the default folder, beside the checkpoint
    first = json.loads((out / "results.json").read_text())
    first_pictures = sorted(os.listdir(out / "visualize"))
    assert "best_02.png" in first_pictures
    capsys.readouterr()
    assert test_svllreid.main([*argv, "TEST.VISUALIZE_N", "1"]) == 0
    logged = capsys.readouterr().out
    assert sorted(os.listdir(out / "visualize")) == ["best_01.png", "cmc.png", "worst_01.png"]   # no stale picture
    moved = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(moved) == 1 and f"moved to {out / moved[0]}" in logged
    assert json.loads((out / moved[0] / "results.json").read_text()) == first
    assert sorted(os.listdir(out / moved[0] / "visualize")) == first_pictures
    assert os.path.isfile(out / moved[0] / "test_log.txt")
    assert json.loads((out / "results.json").read_text())["config"]["TEST"]["VISUALIZE_N"] == 1
    # a third one, within the same second or not, gets a sub-folder of its own
    assert test_svllreid.main([*argv, "TEST.VISUALIZE_N", "1"]) == 0
    assert len([n for n in os.listdir(out) if n.startswith("previous-")]) == 2


# ----------------------------------------------------------------------------- ONNX export
@pytest.mark.slow
def test_onnx_opset_is_the_true_one_and_the_file_follows_the_umask(tiny_root, weight, tmp_path, capsys):
    import stat

    import onnx

    from retrieval.export import opset_of, read_onnx_metadata
    from tools import export_onnx
    from utils.logger import setup_logger
    setup_logger("svllreid", None, if_train=False)   # log to this test's stdout (the tool sets up no logger)
    q = os.path.join(tiny_root, "query")
    argv = ["--config_file", DEMO, *tool_opts(tiny_root, weight), "--images", q, "--verify_batch", "2"]
    out = tmp_path / "m7.onnx"
    assert export_onnx.main([*argv, "--out", str(out), "--opset", "7"]) == 2     # the exporter cannot honour it
    one_line_error(capsys, "--opset 7", "opset 18", "no file written")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    out = tmp_path / "m.onnx"
    old = os.umask(0o022)
    try:
        assert export_onnx.main([*argv, "--out", str(out), "--opset", "17"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644      # like checkpoints and results, not mkstemp's 0600
    assert read_onnx_metadata(str(out))["opset"] == "17" == str(opset_of(onnx.load(str(out))))


# ----------------------------------------------------------------------------- plot_curves
def _plot(tmp_path, lines):
    from tools import plot_curves
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return plot_curves.main([str(tmp_path)])


def test_plot_curves_refuses_a_record_without_usable_lines(tmp_path, capsys):
    assert _plot(tmp_path, ["garbage", "[1, 2]", "3", '{"kind": "eval", "stage": 2, "mAP": 0.5}']) == 2
    one_line_error(capsys, tmp_path / "metrics.jsonl", "no usable record")
    assert not (tmp_path / "curves.png").exists()


def test_plot_curves_skips_bad_lines_with_one_warning(tmp_path, capsys):
    good = [json.dumps({"stage": 1, "epoch": 1, "iteration": None, "kind": "epoch", "loss": 2.0}),
            json.dumps({"stage": 2, "epoch": 1, "iteration": None, "kind": "epoch", "loss": 1.0, "acc": 0.5}),
            json.dumps({"stage": 2, "epoch": 1, "kind": "eval", "mAP": 0.3, "R1": 0.4, "mINP": 0.1})]
    bad = ["[1, 2]", '"text"', '{"kind": "eval", "stage": 2, "mAP": 0.5}', '{"stage": 2, "ep']
    assert _plot(tmp_path, [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]]) == 0
    cap = capsys.readouterr()
    warned = [line for line in (cap.out + cap.err).splitlines() if "skipped" in line]
    assert len(warned) == 1 and "4 of 7 line(s) skipped" in warned[0] and "line 2" in warned[0]
    assert str(tmp_path / "metrics.jsonl") in warned[0] and "Traceback" not in cap.err
    from PIL import Image
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG"


def test_interrupted_search_keeps_the_previous_results_whole(tiny_root, weight, gallery_npz, tmp_path, monkeypatch):
    out = tmp_path / "out"
    qdir = os.path.join(tiny_root, "query")
    assert _search(tiny_root, weight, qdir, gallery_npz, out, "--topk", "3") == 0
    before = {n: (out / "ranked" / n).read_bytes() for n in os.listdir(out / "ranked")}
    results = (out / "results.json").read_bytes()
    drawn = []
    original = search_tool.draw_ranked_list

    def interrupted_after_one(*a, **k):
        if drawn:
            raise KeyboardInterrupt
        drawn.append(original(*a, **k))
        return drawn[-1]

    monkeypatch.setattr(search_tool, "draw_ranked_list", interrupted_after_one)
    assert _search(tiny_root, weight, qdir, gallery_npz, out, "--topk", "5") == 130
    assert (out / "results.json").read_bytes() == results
    assert {n: (out / "ranked" / n).read_bytes() for n in os.listdir(out / "ranked")} == before
    assert not [n for n in os.listdir(out) if n.startswith(".svllreid-partial")]


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_feature_file_cut_short_is_one_line(tmp_path, keep):
    """A copy cut off part-way (a full disk, an interrupted transfer): the file is named in one line
    (was zipfile.BadZipFile's traceback, from --merge, search --gallery and the launcher alike)."""
    from config import ConfigError
    from retrieval.features import FeatureSet
    path = str(tmp_path / "feats.npz")
    FeatureSet(np.random.default_rng(0).random((40, 16), dtype=np.float32), [f"{i}.jpg" for i in range(40)],
               np.arange(40), np.zeros(40, dtype=np.int64)).save(path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])
    with pytest.raises(ConfigError) as e:
        FeatureSet.load(path)
    assert "\n" not in str(e.value) and path in str(e.value) and "cut short" in str(e.value)
