"""The two CPU demo configs: the RN50 demo is a tiny RN50 of the same architecture as the full
one, it differs from the ViT demo only in backbone keys, and it trains through both stages."""
import math
import os
import re

import pytest
import torch

import train_svllreid
from config import get_default_config, load_config
from model import make_model
from model.clip import build_random_clip
from model.clip.model import ModifiedResNet
from tests.helpers import flat_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_DEMO = os.path.join(ROOT, "configs/demo/vit_svllreid_demo.yml")
CNN_DEMO = os.path.join(ROOT, "configs/demo/cnn_svllreid_demo.yml")

# Keys the RN50 demo may set differently from the ViT demo: the backbone and where it writes.
BACKBONE_KEYS = {"MODEL.NAME", "MODEL.CLIP_ARCH.VISION_WIDTH", "MODEL.CLIP_ARCH.VISION_LAYERS",
                 "MODEL.STRIDE_SIZE", "MODEL.SIE_CAMERA", "MODEL.SIE_COE", "OUTPUT_DIR"}


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("path", [VIT_DEMO, CNN_DEMO], ids=["vit", "cnn"])
def test_demo_configs_are_random_init_cpu_runs(path):
    cfg = load_config(path)
    assert cfg.MODEL.CLIP_INIT == "random" and cfg.MODEL.DEVICE == "cpu"
    assert cfg.DATASETS.NAMES == "folder" and cfg.MODEL.USE_SSL and cfg.MODEL.USE_SSL_STAGE1


def test_rn50_demo_differs_from_vit_demo_only_in_the_backbone():
    vit, cnn = flat_config(load_config(VIT_DEMO)), flat_config(load_config(CNN_DEMO))
    differing = {k for k in vit if vit[k] != cnn[k]}
    assert differing <= BACKBONE_KEYS, f"RN50 demo drifted from the ViT demo: {sorted(differing - BACKBONE_KEYS)}"
    assert cnn["MODEL.NAME"] == "RN50" and cnn["OUTPUT_DIR"] != vit["OUTPUT_DIR"]


@pytest.mark.slow
def test_rn50_demo_is_a_tiny_rn50_of_the_same_architecture():
    cfg = load_config(CNN_DEMO)
    model = make_model(cfg, num_class=64, camera_num=4, view_num=1)
    encoder = model.image_encoder
    assert isinstance(encoder, ModifiedResNet)
    assert [len(s) for s in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)] == [1, 1, 1, 1]
    assert encoder.conv3.out_channels == cfg.MODEL.CLIP_ARCH.VISION_WIDTH
    assert _num_params(model) < 2_000_000
    # Same architecture as the full RN50: every image-tower weight name exists there (OpenAI key
    # names), with the layer4 stride 1 feature grid and the 32x stem-width pooled feature.
    h, w = cfg.INPUT.SIZE_TRAIN[0] // 16, cfg.INPUT.SIZE_TRAIN[1] // 16
    full = build_random_clip("RN50", h, w, 16).visual
    assert set(encoder.state_dict()) <= set(full.state_dict())
    assert _num_params(full) > 10 * _num_params(encoder)
    assert model.feature_dims == (16 * 8, 32 * 8, cfg.MODEL.CLIP_ARCH.EMBED_DIM)
    model.eval()
    with torch.no_grad():
        feat = model(torch.randn(2, 3, *cfg.INPUT.SIZE_TEST))
    assert feat.shape == (2, 32 * 8 + cfg.MODEL.CLIP_ARCH.EMBED_DIM) and torch.isfinite(feat).all()


@pytest.mark.slow
def test_rn50_demo_trains_both_stages(tiny_root, tmp_path):
    """One stage-1 and one stage-2 epoch on the tiny synthetic set, through train_svllreid.train."""
    out = tmp_path / "run"
    cfg = load_config(CNN_DEMO, [
        "DATASETS.ROOT_DIR", tiny_root, "OUTPUT_DIR", str(out), "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.NUM_INSTANCE", "2", "SOLVER.STAGE1.MAX_EPOCHS", "1", "SOLVER.STAGE1.IMS_PER_BATCH", "12",
        "SOLVER.STAGE2.MAX_EPOCHS", "1", "SOLVER.STAGE2.IMS_PER_BATCH", "8", "SOLVER.STAGE2.STEPS", "[1, 2]",
        "SOLVER.STAGE1.LOG_PERIOD", "1", "SOLVER.STAGE2.LOG_PERIOD", "1", "TEST.IMS_PER_BATCH", "16"])
    result = train_svllreid.train(cfg)["trained"]
    assert 0.0 < result["mAP"] <= 1.0 and len(result["cmc"]) == cfg.TEST.MAX_RANK
    assert (out / "RN50_stage1_1.pth").is_file() and (out / "RN50_1.pth").is_file()

    log = (out / "train_log.txt").read_text()
    stage1 = re.findall(r"Stage1 epoch\[1\] iter\[\d+/\d+\] loss (\S+) \(i2t (\S+), t2i (\S+), ssl (\S+)\)", log)
    stage2 = re.findall(r"Stage2 epoch\[1\] iter\[\d+/\d+\] loss (\S+) \(id (\S+) tri (\S+) i2t (\S+) ssl (\S+)\)", log)
    assert stage1 and stage2, "no loss lines in train_log.txt"
    values = [float(v) for row in stage1 + stage2 for v in row]
    assert all(math.isfinite(v) for v in values)
    # both self-supervised terms ran (a SimCLR loss is > 0 whenever it is computed)
    assert all(float(row[3]) > 0 for row in stage1) and all(float(row[4]) > 0 for row in stage2)


def test_default_clip_arch_keeps_the_named_rn50():
    """CLIP_ARCH zeros mean the named architecture: the full RN50 has (3, 4, 6, 3) blocks, stem 64."""
    a = get_default_config().MODEL.CLIP_ARCH
    assert a.VISION_WIDTH == 0 and a.VISION_LAYERS == 0
    clip = build_random_clip("RN50", 4, 2, 16, vision_width=a.VISION_WIDTH, vision_layers=a.VISION_LAYERS,
                             text_width=64, text_layers=1)
    v = clip.visual
    assert [len(s) for s in (v.layer1, v.layer2, v.layer3, v.layer4)] == [3, 4, 6, 3]
    assert v.conv3.out_channels == 64
