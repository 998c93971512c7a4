"""Configuration: every YAML loads, overrides apply, bad values fail naming the key."""
import os

import pytest

from config import ConfigError, get_default_config, load_config
from tests.helpers import CONFIG_YAMLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = CONFIG_YAMLS   # the grid files under configs/ablations/ are tested in test_ablate.py


def test_all_flavours_exist():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in YAMLS}
    for domain in ("person", "veri", "VehicleID"):
        for flavour in ("vit_svllreid", "vit_base", "cnn_svllreid", "cnn_base"):
            assert f"{domain}/{flavour}.yml" in names
    assert any(n.startswith("demo/") for n in names)


@pytest.mark.parametrize("path", YAMLS, ids=[os.path.relpath(p, ROOT) for p in YAMLS])
def test_yaml_loads_and_freezes(path):
    cfg = load_config(path)
    assert cfg.is_frozen()
    if "base" in os.path.basename(path):
        assert not cfg.MODEL.PROMPT_LEARNING and not cfg.MODEL.USE_SSL and cfg.MODEL.I2T_LOSS_WEIGHT == 0


def test_published_person_values():
    c = load_config(os.path.join(ROOT, "configs/person/vit_svllreid.yml"))
    assert list(c.INPUT.SIZE_TRAIN) == [256, 128] and list(c.MODEL.STRIDE_SIZE) == [12, 12]
    assert c.MODEL.SIE_CAMERA and c.MODEL.SIE_COE == 1.0 and c.DATALOADER.NUM_INSTANCE == 4
    s1, s2 = c.SOLVER.STAGE1, c.SOLVER.STAGE2
    assert (s1.IMS_PER_BATCH, s1.BASE_LR, s1.WARMUP_EPOCHS, s1.WARMUP_LR_INIT, s1.LR_MIN, s1.MAX_EPOCHS) == \
        (256, 3.5e-4, 5, 1e-5, 1e-6, 120)
    assert (s1.SSL_LOSS_WEIGHT, s1.PROMPT_AUG_SCALE, s1.PROMPT_AUG_METHOD) == (0.8, 0.5, "mask")
    assert (s2.IMS_PER_BATCH, s2.BASE_LR, s2.WARMUP_ITERS, s2.WARMUP_FACTOR, list(s2.STEPS), s2.MAX_EPOCHS) == \
        (64, 5e-6, 10, 0.1, [30, 50], 60)
    assert (s2.SSL_LOSS_WEIGHT, c.MODEL.ID_LOSS_WEIGHT, c.MODEL.TRIPLET_LOSS_WEIGHT, c.SOLVER.MARGIN) == \
        (0.8, 0.25, 1.0, 0.3)
    v = load_config(os.path.join(ROOT, "configs/veri/vit_svllreid.yml"))
    assert list(v.INPUT.SIZE_TRAIN) == [256, 256] and v.MODEL.SIE_CAMERA and v.MODEL.SIE_VIEW
    assert (v.SOLVER.STAGE1.IMS_PER_BATCH, v.SOLVER.STAGE1.MAX_EPOCHS, v.SOLVER.STAGE1.SSL_LOSS_WEIGHT,
            v.SOLVER.STAGE2.IMS_PER_BATCH) == (64, 60, 2.0, 32)
    h = load_config(os.path.join(ROOT, "configs/VehicleID/vit_svllreid.yml"))
    assert (h.SOLVER.STAGE2.BASE_LR, h.SOLVER.STAGE1.SSL_LOSS_WEIGHT) == (5e-5, 0.8)


def test_overrides_apply():
    c = load_config(os.path.join(ROOT, "configs/person/vit_svllreid.yml"),
                    ["SOLVER.STAGE1.PROMPT_AUG_METHOD", "mix", "MODEL.USE_SSL", "False",
                     "SOLVER.STAGE2.BASE_LR", "1e-4", "INPUT.SIZE_TRAIN", "[384, 128]", "DATASETS.NAMES", "msmt17"])
    assert c.SOLVER.STAGE1.PROMPT_AUG_METHOD == "mix" and c.MODEL.USE_SSL is False
    assert c.SOLVER.STAGE2.BASE_LR == 1e-4 and list(c.INPUT.SIZE_TRAIN) == [384, 128]
    assert c.DATASETS.NAMES == "msmt17"


@pytest.mark.parametrize("key,value", [("SOLVER.STAGE1.PROMPT_AUG_METHOD", "foo"), ("DATASETS.NAMES", "market"),
                                       ("MODEL.SSL_TYPE", "BYOL"), ("TEST.FEAT_NORM", "maybe"),
                                       ("MODEL.NAME", "ViT-L-14"), ("TEST.NECK_FEAT", "middle")])
def test_invalid_choice_names_key_value_and_choices(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [key, value])
    msg = str(e.value)
    assert key in msg and repr(value) in msg and "choose one of" in msg and "\n" not in msg


def test_unknown_key_and_odd_overrides_are_clear():
    with pytest.raises(ConfigError, match="MODEL.NOPE"):
        load_config(None, ["MODEL.NOPE", "1"])
    with pytest.raises(ConfigError, match="KEY VALUE"):
        load_config(None, ["MODEL.NAME"])
    with pytest.raises(ConfigError, match="IMS_PER_BATCH"):
        load_config(None, ["SOLVER.STAGE2.IMS_PER_BATCH", "30", "DATALOADER.NUM_INSTANCE", "4"])


def test_yes_no_words_are_honoured_as_written(tmp_path):
    y = tmp_path / "c.yml"
    y.write_text("TEST:\n  FEAT_NORM: no\n  RE_RANKING: yes\nMODEL:\n  IF_LABELSMOOTH: off\n  SIE_CAMERA: on\n")
    c = load_config(str(y))
    assert c.TEST.FEAT_NORM == "no" and c.MODEL.IF_LABELSMOOTH == "off"
    assert c.TEST.RE_RANKING is True and c.MODEL.SIE_CAMERA is True
    c = load_config(None, ["TEST.FEAT_NORM", "no", "TEST.RE_RANKING", "yes", "MODEL.SIE_VIEW", "off"])
    assert c.TEST.FEAT_NORM == "no" and c.TEST.RE_RANKING is True and c.MODEL.SIE_VIEW is False


def test_missing_file_and_clone_independence():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yml")
    a = get_default_config()
    b = a.clone()
    b.MODEL.NAME = "RN50"
    assert a.MODEL.NAME == "ViT-B-16"
