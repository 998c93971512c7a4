"""ONNX export: onnxruntime features equal PyTorch eval features (ViT, ViT stride-12 geometry, RN50;
dynamic batch; with and without side information), metadata props, clear errors."""
import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from config import load_config
from model import make_model
from retrieval import export as onnx_export
from retrieval.export import export, read_onnx_metadata
from utils.checkpoint import load_model_weights

DEMO = "configs/demo/vit_svllreid_demo.yml"
RN50_TINY = ["MODEL.NAME", "RN50", "MODEL.CLIP_ARCH.VISION_LAYERS", "1", "MODEL.CLIP_ARCH.VISION_WIDTH", "8"]
NO_SIE = ["MODEL.SIE_CAMERA", "False"]

# name: (config overrides, classes, cameras, views, expected side inputs, dataset readable)
# Camera/view counts match the tiny test set (2 cameras, 1 view) where it is read, so that evaluation
# would use the SIE table on it; the view-only case has no readable dataset (the check then runs on
# random input) because the test set has a single view.
CASES = {
    "vit_s12_sie_cam": ([], 6, 2, 1, ["camid"], True),
    "vit_s16_no_sie_after": (NO_SIE + ["MODEL.STRIDE_SIZE", "[16,16]", "TEST.NECK_FEAT", "after"], 6, 2, 1, [], True),
    "vit_s12_256x128_sie_view": (NO_SIE + ["MODEL.SIE_VIEW", "True", "INPUT.SIZE_TRAIN", "[256,128]",
                                           "INPUT.SIZE_TEST", "[256,128]"], 5, 1, 4, ["viewid"], False),
    "vit_s12_sie_cam_view": (["MODEL.SIE_VIEW", "True"], 8, 2, 1, ["camid", "viewid"], True),
    "rn50_no_sie": (RN50_TINY + NO_SIE, 6, 2, 1, [], True),
    "rn50_sie_ignored": (RN50_TINY + ["TEST.NECK_FEAT", "after"], 6, 2, 1, [], True),
}


def _randomise_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine and running statistics (fresh ones are identities in eval mode)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean = 0.1 * torch.randn(n, generator=gen)
            m.running_var = 0.5 + torch.rand(n, generator=gen)


def _cfg(tmp_path, root, opts):
    return load_config(DEMO, ["DATASETS.ROOT_DIR", root, "OUTPUT_DIR", str(tmp_path / "out")] + list(opts))


def _checkpoint(cfg, path, classes, cams, views):
    torch.manual_seed(0)
    model = make_model(cfg, num_class=classes, camera_num=cams, view_num=views)
    _randomise_batchnorm(model, torch.Generator().manual_seed(1))
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_root):
    """Every case exported once with the tool's function (trace batch 2)."""
    out = {}
    for name, (opts, classes, cams, views, _, readable) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        cfg = _cfg(d, tiny_root if readable else str(d / "no_dataset"), opts)
        weight = _checkpoint(cfg, str(d / "model.pth"), classes, cams, views)
        cfg = _cfg(d, cfg.DATASETS.ROOT_DIR, list(opts) + ["TEST.WEIGHT", weight])
        report = export(cfg, str(d / "sub" / "model.onnx"), batch=2, verify_batch=5)
        out[name] = (cfg, report, classes, cams, views)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_onnxruntime_equals_pytorch_eval_features(exported, name):
    cfg, report, classes, cams, views = exported[name]
    side = CASES[name][4]
    # the evaluation's model: built from the config, the checkpoint loaded strictly, eval mode
    model = make_model(cfg, num_class=classes, camera_num=cams, view_num=views)
    load_model_weights(model, cfg.TEST.WEIGHT)
    model.eval()
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] + side
    h, w = cfg.INPUT.SIZE_TEST
    g = torch.Generator().manual_seed(7)
    for n in (1, 5):                                         # the graph was traced with batch 2
        x = torch.randn(n, 3, h, w, generator=g)
        cam = torch.randint(0, cams, (n,), generator=g)
        view = torch.randint(0, views, (n,), generator=g)
        with torch.no_grad():
            ref = model(x, cam_label=cam if "camid" in side else None,
                        view_label=view if "viewid" in side else None).numpy()
        feed = {"images": x.numpy(), "camid": cam.numpy(), "viewid": view.numpy()}
        got = session.run(["features"], {k: feed[k] for k in ["images"] + side})[0]
        assert got.shape == ref.shape == (n, int(report.metadata["feat_dim"]))
        assert np.abs(got - ref).max() <= 1e-4
        assert np.abs(ref).max() > 1e-2                         # not a vanishing feature
    if side:   # the side input really reaches the graph: another camera/view gives another feature
        x = torch.randn(1, 3, h, w, generator=g)
        a = {"images": x.numpy(), "camid": np.zeros(1, np.int64), "viewid": np.zeros(1, np.int64)}
        b = dict(a, **{side[0]: np.ones(1, np.int64)})
        fa = session.run(["features"], {k: a[k] for k in ["images"] + side})[0]
        fb = session.run(["features"], {k: b[k] for k in ["images"] + side})[0]
        assert np.abs(fa - fb).max() > 1e-3
    # the tool's own check ran on real images (when it could read them) and passed
    if CASES[name][5]:
        assert report.source.startswith("4 query image(s)")
        assert {c["batch"] for c in report.checks} == {1, 4}
    else:
        assert report.source.startswith("random normal input") and {c["batch"] for c in report.checks} == {1, 5}
    assert all(c["max_abs_diff"] <= 1e-4 for c in report.checks)


@pytest.mark.slow
def test_graph_is_valid_with_symbolic_batch(exported):
    for name, (_, report, *_rest) in exported.items():
        m = onnx.load(report.path)
        onnx.checker.check_model(m, full_check=True)
        assert m.opset_import[0].version >= 18
        for value in list(m.graph.input) + list(m.graph.output):
            batch = value.type.tensor_type.shape.dim[0]
            assert batch.dim_param and not batch.HasField("dim_value"), (name, value.name)
        types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
        assert types.pop("images") == onnx.TensorProto.FLOAT
        assert set(types.values()) <= {onnx.TensorProto.INT64}


@pytest.mark.slow
def test_metadata_props(exported):
    cfg, report, classes, cams, views = exported["vit_s12_sie_cam"]
    meta = read_onnx_metadata(report.path)
    assert meta == report.metadata
    assert meta["model"] == "ViT-B-16"
    assert meta["input_size"] == "128,64"
    assert meta["pixel_mean"] == "0.5,0.5,0.5" and meta["pixel_std"] == "0.5,0.5,0.5"
    assert meta["resize_interpolation"] == "bilinear"
    assert meta["feat_dim"] == "128"                        # 64 (CLS) + 64 (projection)
    assert meta["uses_sie"] == "true" and meta["sie_inputs"] == "camid"
    assert meta["sie_cameras"] == "2" and meta["sie_views"] == "0"
    assert meta["stride_size"] == "12,12" and meta["opset"] == "18"
    with open(cfg.TEST.WEIGHT, "rb") as f:
        assert meta["checkpoint_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["checkpoint"] == os.path.abspath(cfg.TEST.WEIGHT)

    both = read_onnx_metadata(exported["vit_s12_sie_cam_view"][1].path)
    assert both["sie_inputs"] == "camid,viewid" and both["sie_cameras"] == "2" and both["sie_views"] == "1"
    view = read_onnx_metadata(exported["vit_s12_256x128_sie_view"][1].path)
    assert view["input_size"] == "256,128" and view["sie_inputs"] == "viewid" and view["sie_views"] == "4"
    rn = read_onnx_metadata(exported["rn50_sie_ignored"][1].path)
    assert rn["model"] == "RN50" and rn["uses_sie"] == "false" and rn["sie_inputs"] == ""
    assert rn["feat_dim"] == str(8 * 32 + 64) and rn["neck_feat"] == "after"


def _tool(argv):
    import tools.export_onnx as tool
    return tool.main(argv)


def test_checkpoint_that_does_not_fit_fails_like_evaluation(tmp_path, tiny_root, capsys):
    import test_svllreid
    # trained at 128x64 (10x5 patch grid at stride 12); the config says 256x128 (21x10): the
    # positional embedding cannot fit. Same sizes as the dataset (8 identities, 2 cameras).
    trained = _cfg(tmp_path, tiny_root, [])
    weight = _checkpoint(trained, str(tmp_path / "wrong.pth"), 8, 2, 1)
    opts = ["DATASETS.ROOT_DIR", tiny_root, "OUTPUT_DIR", str(tmp_path / "out"), "TEST.WEIGHT", weight,
            "INPUT.SIZE_TRAIN", "[256,128]", "INPUT.SIZE_TEST", "[256,128]"]
    capsys.readouterr()
    assert test_svllreid.main(["--config_file", DEMO] + opts) == 2
    eval_err = capsys.readouterr().err.strip()
    out = tmp_path / "new" / "model.onnx"
    assert _tool(["--config_file", DEMO, "--out", str(out)] + opts) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == eval_err.splitlines()[-1]
    assert err.startswith("error: ") and "does not fit the model" in err
    assert "image_encoder.positional_embedding" in err
    assert not out.exists()


def test_missing_checkpoint_and_empty_weight_are_one_line_errors(tmp_path, tiny_root, capsys):
    out = str(tmp_path / "m.onnx")
    base = ["--config_file", DEMO, "--out", out, "DATASETS.ROOT_DIR", tiny_root]
    assert _tool(base + ["TEST.WEIGHT", str(tmp_path / "nope.pth")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: checkpoint not found: {tmp_path / 'nope.pth'}"
    assert _tool(base) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: TEST.WEIGHT is empty")


@pytest.mark.slow
def test_mismatch_above_tolerance_is_an_error_and_writes_nothing(tmp_path, tiny_root, capsys, monkeypatch):
    cfg = _cfg(tmp_path, tiny_root, NO_SIE)
    weight = _checkpoint(cfg, str(tmp_path / "model.pth"), 8, 2, 1)
    real = onnx_export._torch_features
    # PyTorch and onnxruntime disagreeing by 1e-3 somewhere (here: PyTorch's side shifted)
    monkeypatch.setattr(onnx_export, "_torch_features", lambda *a: real(*a) + 1e-3)
    out = tmp_path / "m.onnx"
    opts = ["--config_file", DEMO, "--out", str(out), "DATASETS.ROOT_DIR", tiny_root, "MODEL.SIE_CAMERA", "False",
            "TEST.WEIGHT", weight]
    assert _tool(opts) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: onnxruntime differs from PyTorch") and "> 0.0001" in err
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.slow
def test_tool_prints_what_a_deployer_needs(exported, tmp_path, capsys):
    cfg, *_ = exported["vit_s12_sie_cam"]
    out = tmp_path / "deep" / "folder" / "m.onnx"            # missing folders are created
    query = os.path.join(cfg.DATASETS.ROOT_DIR, "query")       # --images before KEY VALUE overrides
    argv = ["--config_file", DEMO, "--out", str(out), "--verify_batch", "3", "--images", query,
            "DATASETS.ROOT_DIR", cfg.DATASETS.ROOT_DIR, "TEST.WEIGHT", cfg.TEST.WEIGHT]
    assert _tool(argv) == 0
    text = capsys.readouterr().out
    assert out.is_file()
    for line in ("inputs:  images float32 [N, 3, 128, 64], camid int64 [N]", "output:  features float32 [N, 128]",
                 "input_size", "pixel_mean", "pixel_std", "feat_dim", "uses_sie", "batch 3: max abs diff",
                 "batch 1: max abs diff", f"on 3 image(s) from {query}:", "OK"):
        assert line in text


@pytest.mark.slow
def test_readme_snippet_preprocesses_like_the_test_transform_and_matches_pytorch(exported, tmp_path, monkeypatch):
    import re
    import shutil

    from datasets.bases import read_image
    from datasets.transforms import build_transforms

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "deploy.md")) as f:
        snippet = re.search(r"<!-- deploy-snippet -->\n```python\n(.*?)```", f.read(), re.S).group(1)
    from retrieval.features import parse_name
    cfg, report, classes, cams, views = exported["vit_s12_sie_cam"]
    query = os.path.join(cfg.DATASETS.ROOT_DIR, "query")
    images = sorted(os.listdir(query))[:2]
    names = re.search(r"paths = (\[.*?\])", snippet).group(1)
    names = eval(names)                                    # the snippet's file names, which carry the cameras
    for src, dst in zip(images, names):
        shutil.copy(os.path.join(query, src), tmp_path / dst)
    shutil.copy(report.path, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(snippet, ns)                                     # the deploy page's own code
    transform = build_transforms(cfg, is_train=False)
    ref_x = torch.stack([transform(read_image(str(tmp_path / n))) for n in names])
    assert torch.equal(torch.from_numpy(ns["x"]), ref_x)  # bit-identical preprocessing
    model = make_model(cfg, num_class=classes, camera_num=cams, view_num=views)
    load_model_weights(model, cfg.TEST.WEIGHT)
    cam = torch.tensor([parse_name(n)[1] for n in names])  # each image's camera, as the project parses it
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.eval()(ref_x, cam_label=cam), dim=1).numpy()
        placeholder = torch.nn.functional.normalize(model(ref_x, cam_label=torch.tensor([0, 1])), dim=1).numpy()
    assert np.abs(ns["f"] - ref).max() <= 1e-5
    assert np.abs(ns["f"] - placeholder).max() > 1e-3     # cameras matter: a placeholder [0, 1] would not pass


def test_verification_batch_sources(tmp_path, tiny_root):
    from datasets.bases import read_image
    from datasets.transforms import build_transforms

    cfg = _cfg(tmp_path, tiny_root, [])
    query = os.path.join(tiny_root, "query")
    x, ids, source = onnx_export.verification_batch(cfg, 3, [query])             # --images FOLDER
    first = os.path.join(query, sorted(os.listdir(query))[0])
    assert x.shape == (3, 3, 128, 64) and ids == {} and source.startswith("3 image(s) from")
    assert torch.equal(x[0], build_transforms(cfg, is_train=False)(read_image(first)))
    dataset, why_not = onnx_export.eval_dataset(cfg)
    assert dataset is not None and why_not == ""
    x, ids, source = onnx_export.verification_batch(cfg, 2, None, dataset)      # the dataset's query images
    assert x.shape[0] == 2 and ids["camid"].shape == (2,) and source.startswith("2 query image(s)")
    gone = _cfg(tmp_path, str(tmp_path / "nowhere"), [])
    dataset, why_not = onnx_export.eval_dataset(gone)
    assert dataset is None and "nowhere" in why_not
    x, ids, source = onnx_export.verification_batch(gone, 2, None, dataset, why_not)   # said so, not hidden
    assert x.shape == (2, 3, 128, 64) and source.startswith("random normal input (no --images")
    with pytest.raises(FileNotFoundError):
        onnx_export.verification_batch(cfg, 2, [str(tmp_path / "missing.jpg")])
