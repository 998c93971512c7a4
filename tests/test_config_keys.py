"""Every config key means what it says: it is read by the code, or a changed value is refused.

A tiny training + evaluation runs with attribute reads of the config recorded; keys that
only some settings read are exercised by the call that reads them. The rest must be
inert keys, whose non-default values fail at load with a line naming the key.
"""
import contextlib
import os

import pytest
import yacs.config

import test_svllreid
import train_svllreid
from config import INERT_KEYS, ConfigError, get_default_config, get_key, load_config
from loss import make_loss
from model import make_model
from solver import make_optimizer_2stage
from tests.helpers import CONFIG_YAMLS, DEMO, fake_vehicleid, flat_config, tiny_cfg


def all_keys():
    """Every key of the default config, dotted."""
    return flat_config(get_default_config()).keys()


@contextlib.contextmanager
def recording_reads():
    """Record the dotted names of the config values read as attributes while active."""
    seen: set[str] = set()
    original = yacs.config.CfgNode.__getattr__

    def getattr_and_record(self, name):
        value = original(self, name)
        prefix = self.__dict__.get("_recorded_prefix", "")
        if isinstance(value, yacs.config.CfgNode):
            value.__dict__["_recorded_prefix"] = f"{prefix}{name}."
        else:
            seen.add(prefix + name)
        return value

    yacs.config.CfgNode.__getattr__ = getattr_and_record
    try:
        yield seen
    finally:
        yacs.config.CfgNode.__getattr__ = original


def _read_conditional_keys(tiny_root, tmp_path):
    """Run the code paths that read the keys a plain run does not."""
    cfg = tiny_cfg(tiny_root, tmp_path / "c", "MODEL.METRIC_LOSS_TYPE", "triplet_center")
    model = make_model(cfg, 8, 2, 1)
    model.set_stage(2)
    _, center = make_loss(cfg, 8, feat_dim=model.feature_dims[0])
    make_optimizer_2stage(cfg, model, center)                                   # SOLVER.STAGE2.CENTER_LR
    cfg = tiny_cfg(tiny_root, tmp_path / "p", "MODEL.CLIP_INIT", "pretrained",
                   "MODEL.PRETRAIN_PATH", str(tmp_path / "none.pt"))
    with pytest.raises(FileNotFoundError):
        make_model(cfg, 8, 2, 1)                                                # MODEL.PRETRAIN_PATH
    with pytest.raises(ConfigError):
        test_svllreid.evaluate(tiny_cfg(tiny_root, tmp_path / "t"))             # TEST.WEIGHT (empty)
    from model import load_for_inference
    load_for_inference(tiny_cfg(tiny_root, tmp_path / "e", "TEST.WEIGHT",
                                str(tmp_path / "run" / "ViT-B-16_2.pth")))     # TEST.USE_SIE (a model with SIE)
    fake_vehicleid(str(tmp_path / "vid"))
    from datasets.make_dataloader import build_dataset_from_cfg
    build_dataset_from_cfg(load_config(DEMO, ["DATASETS.NAMES", "VehicleID", "DATASETS.ROOT_DIR",
                                              str(tmp_path / "vid")]))           # VEHICLEID_TEST_SIZE
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:                                                                        # MODEL.DIST_TIMEOUT
        train_svllreid.train(tiny_cfg(tiny_root, tmp_path / "d", "MODEL.DIST_TRAIN", "True",
                                      "SOLVER.STAGE1.MAX_EPOCHS", "1", "SOLVER.STAGE2.MAX_EPOCHS", "1"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Read on a path too costly for this test (ten VehicleID trials); checked by name in the code.
READ_ELSEWHERE = {"DATASETS.VEHICLEID_TRIALS": "test_svllreid.py",
                  # evaluation pictures (exercised by tests/test_usage.py)
                  "TEST.VISUALIZE": "test_svllreid.py", "TEST.VISUALIZE_N": "processor/inference.py",
                  "TEST.VISUALIZE_TOPK": "processor/inference.py"}


@pytest.mark.slow
def test_every_key_is_read_or_refused(tiny_root, tmp_path):
    with recording_reads() as seen:
        train_svllreid.train(tiny_cfg(tiny_root, tmp_path / "run"))
        _read_conditional_keys(tiny_root, tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for key, path in READ_ELSEWHERE.items():
        with open(os.path.join(root, path)) as f:
            assert f"cfg.{key}" in f.read(), key
    unread = set(all_keys()) - seen - set(READ_ELSEWHERE)
    assert unread == set(INERT_KEYS), (
        f"read nowhere and not declared inert: {sorted(unread - set(INERT_KEYS))}; "
        f"declared inert but read: {sorted(set(INERT_KEYS) - unread)}")


def _other_value(value):
    if isinstance(value, bool):
        return str(not value)
    if isinstance(value, (int, float)):
        return str(value + 7)
    if isinstance(value, (list, tuple)):
        return str([x + 1 for x in value])
    return "something_else"


@pytest.mark.parametrize("key", sorted(INERT_KEYS))
def test_inert_key_loads_at_default_and_refuses_a_change(key, capsys):
    default = get_key(get_default_config(), key)
    load_config(DEMO, [key, str(list(default)) if isinstance(default, tuple) else str(default)])
    assert train_svllreid.main(["--config_file", DEMO, key, _other_value(default)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and "no effect" in err


def test_published_yamls_still_load():
    assert len(CONFIG_YAMLS) >= 13
    for f in CONFIG_YAMLS:
        load_config(f)


@pytest.mark.parametrize("value,ok", [("0", True), ("0,1", True), ("1", True), ("a", False), ("0,", False)])
def test_device_id_is_a_gpu_list(value, ok):
    if ok:
        assert load_config(DEMO, ["MODEL.DEVICE_ID", value]).MODEL.DEVICE_ID == value
    else:
        with pytest.raises(ConfigError, match="MODEL.DEVICE_ID"):
            load_config(DEMO, ["MODEL.DEVICE_ID", value])


def test_device_id_sets_visible_gpus(monkeypatch):
    from utils.misc import select_gpus
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert select_gpus("1,2") == "1,2" and os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")          # the environment wins
    assert select_gpus("0") == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="4 processes"):
        select_gpus("0")
