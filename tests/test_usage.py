"""Using a trained model: the training record, redirected output, feature extraction equal to
the evaluation's, top-k search, evaluation pictures, and clear failures for bad input."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import test_svllreid
from config import ConfigError
from datasets.make_dataloader import build_dataset_from_cfg, make_val_loader
from model import make_model
from processor.inference import evaluate_features, extract_features
from processor.progress import progress_enabled
from tests.helpers import DEMO, opts_of, tiny_cfg
from tools import extract_features as extract_tool
from tools import search as search_tool
from utils.checkpoint import load_model_weights
from utils.metrics import eval_func, pairwise_distance
from utils.record import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


LOG_OPTS = ["SOLVER.STAGE1.LOG_PERIOD", "2", "SOLVER.STAGE2.LOG_PERIOD", "1", "SOLVER.STAGE2.EVAL_PERIOD", "1"]


def _is_png(path, min_w=300, min_h=150):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] >= min_w and im.size[1] >= min_h


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """A tiny 2+2-epoch run through the CLI, stdout and stderr redirected to files (not a terminal)."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(tiny_root, out, *LOG_OPTS)
    opts = [kv for k in ("OUTPUT_DIR",) for kv in (k, str(out))] + opts_of(cfg) + [
        "INPUT.PADDING", "2", "SOLVER.STAGE1.MAX_EPOCHS", "2", "SOLVER.STAGE1.IMS_PER_BATCH", "12",
        "SOLVER.STAGE2.MAX_EPOCHS", "2", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "2", "SOLVER.STAGE1.CHECKPOINT_PERIOD", "2",
        "SOLVER.STAGE2.STEPS", "[1, 2]", "TEST.IMS_PER_BATCH", "16", *LOG_OPTS]
    env = {k: v for k, v in os.environ.items() if k != "SVLLREID_PROGRESS"}
    env["OMP_NUM_THREADS"] = "1"
    with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
        code = subprocess.call([sys.executable, os.path.join(ROOT, "train_svllreid.py"), "--config_file", DEMO, *opts],
                               stdout=so, stderr=se, env=env, cwd=ROOT)
    assert code == 0, (out / "stderr.txt").read_text()[-2000:]
    return cfg, out, opts


# ----------------------------------------------------------------------------- training record
@pytest.mark.slow
def test_metrics_jsonl_has_a_line_per_log_period(trained):
    cfg, out, _ = trained
    recs = read_metrics(str(out / "metrics.jsonl"))
    log = (out / "train_log.txt").read_text()
    stage_keys = {1: {"loss", "i2t", "t2i", "ssl", "lr"}, 2: {"loss", "id", "tri", "i2t", "ssl", "acc", "lr"}}
    for stage, keys in stage_keys.items():
        logged = [(int(e), int(i)) for e, i in re.findall(rf"Stage{stage} epoch\[(\d+)\] iter\[(\d+)", log)]
        periods = [r for r in recs if r["stage"] == stage and r["kind"] == "period"]
        assert logged and [(r["epoch"], r["iteration"]) for r in periods] == logged
        for r in periods + [r for r in recs if r["stage"] == stage and r["kind"] == "epoch"]:
            assert keys <= r.keys() and all(math.isfinite(r[k]) for k in keys)
            assert r["time"] > 0 and r["elapsed"] >= 0
        assert sorted(r["epoch"] for r in recs if r["stage"] == stage and r["kind"] == "epoch") == [1, 2]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    with open(out / "results.json") as f:
        final = json.load(f)
    assert evals[-1]["mAP"] == final["mAP"] and evals[-1]["cmc"] == final["cmc"]
    assert evals[-1]["R1"] == final["cmc"][0] and evals[-1]["mINP"] == final["mINP"]


@pytest.mark.slow
def test_tensorboard_has_the_same_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, out, _ = trained
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    recs = read_metrics(str(out / "metrics.jsonl"))
    tags = set(acc.Tags()["scalars"])
    assert {"stage1/period/loss", "stage2/period/tri", "stage2/epoch/acc", "stage2/eval/mAP"} <= tags
    loss = [e.value for e in acc.Scalars("stage2/period/loss")]
    assert loss == pytest.approx([r["loss"] for r in recs if r["stage"] == 2 and r["kind"] == "period"])
    assert [e.value for e in acc.Scalars("stage2/eval/mAP")] == pytest.approx(
        [r["mAP"] for r in recs if r["kind"] == "eval"])


@pytest.mark.slow
def test_curves_png_written(trained, tmp_path, capsys):
    _, out, _ = trained
    assert _is_png(out / "curves.png", min_w=1000, min_h=300)
    from tools import plot_curves
    assert plot_curves.main([str(out), "--out", str(tmp_path / "c.png")]) == 0
    assert _is_png(tmp_path / "c.png", min_w=1000, min_h=300)
    assert plot_curves.main([str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_redirected_output_has_no_progress_bars(trained):
    _, out, _ = trained
    stdout, stderr = (out / "stdout.txt").read_text(), (out / "stderr.txt").read_text()
    assert "\r" not in stdout and "\r" not in stderr and "it/s" not in stderr
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d svllreid")
    for needle in ("Validation results", "Stage2 epoch[1] iter[1/", "Training record:"):
        lines = [ln for ln in stdout.splitlines() if needle in ln]
        assert lines and all(stamp.match(ln) for ln in lines), needle


def test_progress_switch(monkeypatch):
    for mode, want in (("off", False), ("on", True), ("auto", False)):   # pytest's stderr is not a terminal
        monkeypatch.setenv("SVLLREID_PROGRESS", mode)
        assert progress_enabled() is want
    monkeypatch.setenv("SVLLREID_PROGRESS", "on")
    monkeypatch.setenv("SVLLREID_NO_TQDM", "1")      # the older second switch is gone: one switch decides
    assert progress_enabled() is True
    monkeypatch.setenv("SVLLREID_PROGRESS", "sometimes")
    with pytest.raises(ConfigError, match="SVLLREID_PROGRESS"):
        progress_enabled()


# ----------------------------------------------------------------------------- feature extraction
def _evaluation_features(cfg, weight):
    """Features of query + gallery as test_svllreid computes them, keyed by file name."""
    dataset = build_dataset_from_cfg(cfg)
    model = make_model(cfg, num_class=dataset.num_train_pids, camera_num=dataset.num_train_cams,
                       view_num=dataset.num_train_vids)
    load_model_weights(model, weight)
    loader, nq = make_val_loader(cfg, dataset)
    feats, pids, camids = extract_features(cfg, model, loader, torch.device("cpu"))
    samples = dataset.query + dataset.gallery
    return {os.path.basename(s[0]): (feats[i].numpy(), s[1], s[2]) for i, s in enumerate(samples)}, feats, pids, \
        camids, nq


@pytest.fixture(scope="module")
def image_dir(tiny_root, tmp_path_factory):
    """query/ and gallery/ copies in nested folders, plus grayscale, RGBA, 16-bit and corrupt files."""
    d = tmp_path_factory.mktemp("images")
    shutil.copytree(os.path.join(tiny_root, "query"), d / "query")
    shutil.copytree(os.path.join(tiny_root, "bounding_box_test"), d / "deep" / "gallery")
    src = sorted(os.listdir(d / "query"))[0]
    (d / "odd").mkdir()
    with Image.open(d / "query" / src) as im:
        im.convert("L").save(d / "odd" / "gray.png")
        im.convert("RGBA").save(d / "odd" / "rgba.png")
        arr = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(arr).save(d / "odd" / "sixteen.png")
        im.resize((50, 170)).save(d / "odd" / "0003_c2_other_size.jpg")
    (d / "odd" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (d / "odd" / "notes.txt").write_text("ignored")
    return d


def _run_extract(cfg, opts, weight, images, out, *extra):
    return extract_tool.main(["--config_file", DEMO, "--images", str(images), "--out", str(out), *extra, *opts,
                              "TEST.WEIGHT", weight])


@pytest.mark.slow
def test_extract_features_equals_evaluation(trained, image_dir, tmp_path, capsys):
    cfg, run, opts = trained
    weight = str(run / "ViT-B-16_2.pth")
    want, *_ = _evaluation_features(cfg, weight)
    out = tmp_path / "f.npz"
    assert _run_extract(cfg, opts, weight, image_dir, out) == 0
    z = np.load(out)
    paths = list(z["paths"])
    assert z["features"].dtype == np.float32 and z["features"].shape == (len(paths), 128)
    assert paths == sorted(paths) and "odd/gray.png" in paths and "odd/rgba.png" in paths
    assert "odd/sixteen.png" in paths and "odd/0003_c2_other_size.jpg" in paths
    assert list(z["failed"]) == ["odd/broken.jpg"] and "odd/notes.txt" not in paths
    assert np.isfinite(z["features"]).all()
    checked = 0
    for i, p in enumerate(paths):
        name = os.path.basename(p)
        if name in want:
            f, pid, cam = want[name]
            assert np.abs(z["features"][i] - f).max() <= 1e-5, p
            assert (z["pids"][i], z["camids"][i]) == (pid, cam)
            checked += 1
        elif p.startswith("odd/") and "0003" not in p:
            assert (z["pids"][i], z["camids"][i]) == (-1, -1)
    assert checked == len(want)
    assert "broken.jpg" in capsys.readouterr().out   # listed at the end of the run


@pytest.mark.slow
def test_extract_features_camera_option_and_sie_warning(trained, image_dir, tmp_path, capsys):
    cfg, run, opts = trained
    weight = str(run / "ViT-B-16_2.pth")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert _run_extract(cfg, opts, weight, image_dir / "odd", a) == 0
    assert "4 image(s) have no camera label" in capsys.readouterr().out
    assert _run_extract(cfg, opts, weight, image_dir / "odd", b, "--camera", "2") == 0
    assert "no camera label" not in capsys.readouterr().out
    za, zb = np.load(a), np.load(b)
    gray = list(za["paths"]).index("gray.png")
    assert za["camids"][gray] == -1 and zb["camids"][gray] == 1
    assert not np.allclose(za["features"][gray], zb["features"][gray])   # SIE is used with the label


@pytest.mark.slow
def test_names_and_cameras_beyond_the_model(trained, image_dir, tmp_path, capsys):
    from retrieval.features import parse_name
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 0) and parse_name("0001_c001_00016450_0.jpg") == (1, 0)
    assert parse_name("-1_c3s2_1.jpg") == (-1, 2) and parse_name("a/b/0007_c0_x.png") == (-1, -1)
    assert parse_name("photo.jpg") == (-1, -1)
    cfg, run, opts = trained
    src = image_dir / "query" / sorted(os.listdir(image_dir / "query"))[0]
    (tmp_path / "in").mkdir()
    shutil.copy(src, tmp_path / "in" / "0005_c9s1_000001_00.jpg")       # the model knows 2 cameras
    assert _run_extract(cfg, opts, str(run / "ViT-B-16_2.pth"), tmp_path / "in", tmp_path / "f.npz") == 0
    z = np.load(tmp_path / "f.npz")
    assert z["pids"].tolist() == [5] and z["camids"].tolist() == [-1]
    assert "camera beyond the model's 2" in capsys.readouterr().out


@pytest.mark.slow
def test_extract_features_bad_input(trained, image_dir, tmp_path, capsys):
    cfg, run, opts = trained
    weight = str(run / "ViT-B-16_2.pth")
    (tmp_path / "empty").mkdir()
    for images, needle in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "no images")):
        assert _run_extract(cfg, opts, weight, images, tmp_path / "x.npz") == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    assert _run_extract(cfg, opts, str(tmp_path / "missing.pth"), image_dir / "query", tmp_path / "x.npz") == 2
    assert "checkpoint not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- search
def _run_search(opts, weight, query, gallery, out, *extra):
    return search_tool.main(["--config_file", DEMO, "--query", str(query), "--gallery", str(gallery),
                             "--out", str(out), *extra, *opts, "TEST.WEIGHT", weight])


def _extract_query_and_gallery(cfg, opts, weight, image_dir, tmp_path):
    """Feature files of the query folder and the nested gallery folder, through the tool."""
    assert _run_extract(cfg, opts, weight, image_dir / "deep" / "gallery", tmp_path / "g.npz") == 0
    assert _run_extract(cfg, opts, weight, image_dir / "query", tmp_path / "q.npz") == 0
    return np.load(tmp_path / "q.npz"), np.load(tmp_path / "g.npz")


@pytest.mark.slow
def test_search_topk_equals_independent_argsort(trained, image_dir, tmp_path, capsys):
    cfg, run, opts = trained
    weight = str(run / "ViT-B-16_2.pth")
    gallery = image_dir / "deep" / "gallery"
    q, g = _extract_query_and_gallery(cfg, opts, weight, image_dir, tmp_path)
    gf = g["features"] / np.linalg.norm(g["features"], axis=1, keepdims=True)
    qf = q["features"] / np.linalg.norm(q["features"], axis=1, keepdims=True)
    dist = (qf ** 2).sum(1)[:, None] + (gf ** 2).sum(1)[None] - 2 * qf @ gf.T
    k = 5
    for n, gal in enumerate((gallery, tmp_path / "g.npz", gallery)):   # folder, npz, folder again (cache)
        out = tmp_path / "s"
        capsys.readouterr()
        assert _run_search(opts, weight, image_dir / "query", gal, out, "--topk", str(k)) == 0
        with open(out / "results.json") as f:
            res = json.load(f)
        assert [os.path.basename(x["query"]) for x in res["queries"]] == [os.path.basename(p) for p in q["paths"]]
        for i, entry in enumerate(res["queries"]):
            order = np.argsort(dist[i], kind="stable")[:k]
            assert [os.path.relpath(h["path"], gallery) for h in entry["results"]] == [g["paths"][j] for j in order]
            assert [h["distance"] for h in entry["results"]] == pytest.approx(dist[i][order].tolist(), abs=1e-5)
            assert [h["rank"] for h in entry["results"]] == list(range(1, k + 1))
            assert _is_png(entry["picture"], min_w=600, min_h=150)
            same = [h["same_identity"] for h in entry["results"]]
            assert same == [bool(h["pid"] == entry["pid"]) for h in entry["results"]]
        logged = capsys.readouterr().out
        assert ("cached features" in logged) == (n == 2)
    # one image as the query
    one = image_dir / "query" / q["paths"][0]
    assert _run_search(opts, weight, one, tmp_path / "g.npz", tmp_path / "one", "--topk", "3") == 0
    with open(tmp_path / "one" / "results.json") as f:
        res = json.load(f)
    assert len(res["queries"]) == 1 and len(res["queries"][0]["results"]) == 3
    assert [os.path.basename(h["path"]) for h in res["queries"][0]["results"]] == \
        [g["paths"][j] for j in np.argsort(dist[0], kind="stable")[:3]]


@pytest.mark.slow
def test_search_rerank_and_cosine_follow_the_config(trained, image_dir, tmp_path):
    cfg, run, opts = trained
    weight = str(run / "ViT-B-16_2.pth")
    from utils.reranking import re_ranking
    q, g = _extract_query_and_gallery(cfg, opts, weight, image_dir, tmp_path)
    qf = torch.nn.functional.normalize(torch.from_numpy(q["features"]), dim=1)
    gf = torch.nn.functional.normalize(torch.from_numpy(g["features"]), dim=1)
    for extra, dist in ((["TEST.RE_RANKING", "True", "TEST.RE_RANKING_K1", "4", "TEST.RE_RANKING_K2", "2"],
                         re_ranking(qf, gf, k1=4, k2=2, lambda_value=0.3)),
                        (["TEST.DIST_METRIC", "cosine"], pairwise_distance(qf, gf, "cosine"))):
        out = tmp_path / extra[0]
        assert _run_search(opts + extra, weight, image_dir / "query", tmp_path / "g.npz", out, "--topk", "4",
                           "--no_pictures") == 0
        with open(out / "results.json") as f:
            res = json.load(f)
        order = torch.sort(dist, dim=1, stable=True).indices[:, :4].numpy()
        for i, entry in enumerate(res["queries"]):
            assert [os.path.basename(h["path"]) for h in entry["results"]] == [g["paths"][j] for j in order[i]]
            assert "picture" not in entry


@pytest.mark.slow
def test_search_bad_input(trained, image_dir, tmp_path, capsys):
    cfg, run, opts = trained
    weight = str(run / "ViT-B-16_2.pth")
    np.savez(tmp_path / "nofeat.npz", paths=np.array(["a.jpg"]))
    np.savez(tmp_path / "wrongdim.npz", features=np.zeros((1, 7), np.float32), paths=np.array(["a.jpg"]))
    (tmp_path / "empty").mkdir()
    q = image_dir / "query"
    cases = [(q, tmp_path / "nope", ["--topk", "3"], "no such gallery"),
             (tmp_path / "nope.jpg", q, ["--topk", "3"], "no such query"),
             (q, q, ["--topk", "0"], "--topk 0"),
             (q, tmp_path / "nofeat.npz", [], "no features"),
             (q, DEMO, [], "not a feature file"),
             (q, tmp_path / "wrongdim.npz", [], "7-d features"),
             (q, tmp_path / "empty", [], "no images")]
    for query, gallery, extra, needle in cases:
        assert _run_search(opts, weight, query, gallery, tmp_path / "out", *extra) == 2, needle
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- evaluation pictures
@pytest.mark.slow
def test_per_query_ap_matches_the_evaluation(trained):
    from utils.visualize import per_query_ap
    cfg, run, _ = trained
    _, feats, pids, camids, nq = _evaluation_features(cfg, str(run / "ViT-B-16_2.pth"))
    f = torch.nn.functional.normalize(feats, dim=1)
    dist = pairwise_distance(f[:nq], f[nq:])
    ap = per_query_ap(dist, pids[:nq], pids[nq:], camids[:nq], camids[nq:])
    _, mAP, _ = eval_func(dist, pids[:nq], pids[nq:], camids[:nq], camids[nq:])
    assert np.nanmean(ap) == pytest.approx(mAP, abs=1e-6)
    from utils.visualize import rank_queries, row_blocks
    ap1, top, top_d = rank_queries(row_blocks(dist, rows=1), pids[:nq], pids[nq:], camids[:nq], camids[nq:], 4)
    np.testing.assert_array_equal(ap1, ap)
    np.testing.assert_array_equal(top, torch.sort(dist, dim=1, stable=True).indices[:, :4].numpy())
    np.testing.assert_allclose(top_d, np.take_along_axis(dist.numpy(), top, 1), atol=1e-6)
    assert evaluate_features(cfg, feats, pids, camids, nq)["mAP"] == pytest.approx(mAP, abs=1e-6)


@pytest.mark.slow
def test_test_visualize_writes_cmc_and_ranked_lists(trained, tmp_path):
    cfg, run, opts = trained
    out = tmp_path / "eval"
    code = test_svllreid.main(["--config_file", DEMO, *opts[2:], "OUTPUT_DIR", str(out), "TEST.WEIGHT",
                               str(run / "ViT-B-16_2.pth"), "TEST.VISUALIZE", "True", "TEST.VISUALIZE_N", "2",
                               "TEST.VISUALIZE_TOPK", "6"])
    assert code == 0
    vis = out / "visualize"
    assert sorted(os.listdir(vis)) == ["best_01.png", "best_02.png", "cmc.png", "worst_01.png", "worst_02.png"]
    assert _is_png(vis / "cmc.png", min_w=500, min_h=350)
    assert all(_is_png(vis / f"{k}_0{i}.png", min_w=700) for k in ("best", "worst") for i in (1, 2))


def test_log_lines_lift_the_progress_bar_on_a_terminal():
    """A log line written while a bar is drawn starts at column 0 of its own line (the bar is cleared first)."""
    import io
    import logging

    from tqdm import tqdm

    from utils.logger import _BarSafeHandler
    buf = io.StringIO()
    log = logging.getLogger("svllreid.test_bar")
    log.propagate = False
    handler = _BarSafeHandler(stream=buf)
    log.addHandler(handler)
    try:
        bar = tqdm(range(3), file=buf, ncols=60, mininterval=0, desc="bar")
        for i in bar:
            log.warning("line %d", i)
        bar.close()
    finally:
        log.removeHandler(handler)
    out = buf.getvalue()
    for i in range(3):
        before = out[:out.index(f"line {i}")]
        assert before.endswith("\r") or before.endswith("\n"), repr(before[-80:])
        assert "bar" not in before.rsplit("\r", 1)[-1].rsplit("\n", 1)[-1]
