"""Edges of the tools (search, evaluation folder, ONNX export, curves): each case is refused with one
line naming the culprit, or gives the right result; nothing stale or mixed is left behind."""
import os
import sys

import pytest
import torch

import test_svllreid
import train_svllreid
from config import load_config
from model import make_model

from test_training import DEMO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import extract_features as extract_tool  # noqa: E402
import search as search_tool  # noqa: E402

SIZE = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0",
        "TEST.IMS_PER_BATCH", "16"]


@pytest.fixture(scope="module")
def weight(tiny_root, tmp_path_factory):
    """A random-weights checkpoint of the tiny demo model (8 identities, 2 cameras): no training needed."""
    d = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(DEMO, ["DATASETS.ROOT_DIR", tiny_root, *SIZE])
    torch.manual_seed(0)
    model = make_model(cfg, num_class=8, camera_num=2, view_num=1)
    path = d / "model.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def _opts(tiny_root, weight, *extra):
    return ["DATASETS.ROOT_DIR", str(tiny_root), *SIZE, "TEST.WEIGHT", weight, *extra]


def _search(tiny_root, weight, query, gallery, out, *flags):
    """The search tool with its flags after the KEY VALUE overrides (accepted anywhere)."""
    return search_tool.main(["--config_file", DEMO, "--query", str(query), "--gallery", str(gallery),
                             *_opts(tiny_root, weight), "--out", str(out), *flags])


# ----------------------------------------------------------------------------- flags anywhere
def test_flags_are_accepted_after_the_overrides_by_every_script():
    import export_onnx
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
