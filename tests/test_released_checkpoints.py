"""Released checkpoints load both ways.

The layouts of the published SVLL-ReID and CLIP-ReID state dicts (tests/data/published_checkpoints)
are expanded to the full depth of the CLIP towers; a state dict with exactly that layout loads
into our model for evaluation, and every key our training writes exists with the same shape in
the published layout of the same configuration (what the published ``load_param`` requires).
Full-size models are built on the meta device (names and shapes, no memory, no init).
"""
from __future__ import annotations

import logging
import os
import re

import pytest
import torch

from config import load_config
from model import make_model
from model.loading import load_state_for_inference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYOUTS = os.path.join(HERE, "data", "published_checkpoints")

VIT_LAYERS = 12                     # ViT-B-16 image tower and the CLIP text tower
RN50_BLOCKS = (3, 4, 6, 3)

# layout file -> (config file, overrides) of the same configuration (Market-1501: 751 ids, 6 cameras)
CONFIGS = {
    "svllreid_vit_SIMCLR": ("configs/person/vit_svllreid.yml", []),
    "svllreid_vit_SIMSIAM": ("configs/person/vit_svllreid.yml", ["MODEL.SSL_TYPE", "SIMSIAM"]),
    "svllreid_rn50_SIMCLR": ("configs/person/cnn_svllreid.yml", []),
    "clipreid_vit": ("configs/person/vit_svllreid.yml", ["MODEL.USE_SSL", "False", "MODEL.USE_SSL_STAGE1", "False",
                                                         "MODEL.STRIDE_SIZE", "[16, 16]", "MODEL.SIE_CAMERA", "False"]),
    "clipreid_rn50": ("configs/person/cnn_svllreid.yml", ["MODEL.USE_SSL", "False", "MODEL.USE_SSL_STAGE1", "False"]),
}


def read_layout(name: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], int, int]:
    """(key -> (shape, dtype) as listed, total tensors, tensors under the two towers)."""
    rows, total, towers = {}, None, None
    with open(os.path.join(LAYOUTS, name + ".tsv")) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#"):
                total, towers = map(int, re.match(r"# (\d+) tensors; (\d+) under", line).groups())
                continue
            key, shape, dtype = line.split("\t")
            rows[key] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype)
    return rows, total, towers


def _rn50_block(prefix: str, inplanes: int, planes: int, downsample: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of one CLIP ResNet bottleneck (expansion 4) under ``prefix``."""
    out = {f"{prefix}conv1.weight": (planes, inplanes, 1, 1), f"{prefix}conv2.weight": (planes, planes, 3, 3),
           f"{prefix}conv3.weight": (planes * 4, planes, 1, 1)}
    bns = {f"{prefix}bn1": planes, f"{prefix}bn2": planes, f"{prefix}bn3": planes * 4}
    if downsample:
        out[f"{prefix}downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
        bns[f"{prefix}downsample.1"] = planes * 4
    for bn, c in bns.items():
        out.update({f"{bn}.weight": (c,), f"{bn}.bias": (c,), f"{bn}.running_mean": (c,), f"{bn}.running_var": (c,),
                    f"{bn}.num_batches_tracked": ()})
    return out


def expand_layout(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The full layout: the listed first block repeated to the full depth, as the listing says."""
    rows, total, towers = read_layout(name)
    full = {}
    for key, (shape, dtype) in rows.items():
        m = re.match(r"(image_encoder|text_encoder)\.transformer\.resblocks\.0\.(.*)", key)
        if m:
            for i in range(VIT_LAYERS):
                full[f"{m.group(1)}.transformer.resblocks.{i}.{m.group(2)}"] = (shape, dtype)
        elif not key.startswith("image_encoder.layer1.0."):
            full[key] = (shape, dtype)
    if "image_encoder.layer1.0.conv1.weight" in rows:        # RN50: rebuild the 16 bottlenecks
        width = rows["image_encoder.layer1.0.conv1.weight"][0][0]
        listed = {k: s for k, (s, _) in rows.items() if k.startswith("image_encoder.layer1.0.")}
        assert listed == _rn50_block("image_encoder.layer1.0.", width, width, True), "pattern differs from the listing"
        inplanes = width
        for stage, blocks in enumerate(RN50_BLOCKS):
            planes = width * 2 ** stage
            for b in range(blocks):
                shapes = _rn50_block(f"image_encoder.layer{stage + 1}.{b}.", inplanes, planes, b == 0)
                full.update({k: (s, "int64" if k.endswith("num_batches_tracked") else "float32")
                             for k, s in shapes.items()})
                inplanes = planes * 4
    assert len(full) == total, f"{name}: expanded to {len(full)} tensors, the listing says {total}"
    assert sum(k.startswith(("image_encoder.", "text_encoder.")) for k in full) == towers
    return full


def cfg_for(name: str, *extra: str):
    config, opts = CONFIGS[name]
    return load_config(os.path.join(ROOT, config), ["MODEL.CLIP_INIT", "random", "MODEL.DEVICE", "cpu",
                                                    "DATASETS.NAMES", "market1501", *opts, *extra])


def meta_model(name: str):
    """Our full-size model of the layout's configuration, on the meta device."""
    with torch.device("meta"):
        return make_model(cfg_for(name), num_class=751, camera_num=6, view_num=1)


def as_state_dict(layout: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, torch.Tensor]:
    """A state dict of that layout; tensor number i is filled with the value i (cheap, and every
    value tells which key it came from)."""
    return {k: torch.full(shape, i, dtype=torch.int64 if dtype == "int64" else torch.float32)
            for i, (k, (shape, dtype)) in enumerate(layout.items())}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_our_checkpoints_load_into_the_published_code(name):
    """Every key our weights file holds is in the published layout with the same shape, so the
    published ``load_param`` (copy every key by name) accepts it; nothing retrieval needs is left out."""
    layout = expand_layout(name)
    ours = {k: tuple(v.shape) for k, v in meta_model(name).published_state_dict().items()}
    foreign = sorted(set(ours) - set(layout))
    shaped = sorted(k for k in ours if k in layout and ours[k] != layout[k][0])
    assert not foreign and not shaped, f"{name}: not in the published layout {foreign[:5]}, mis-shaped {shaped[:5]}"
    not_written = set(layout) - set(ours)
    if name == "svllreid_rn50_SIMCLR":   # the published RN50 SSL heads take 64-d / 512-d input; ours 2048 / 1024
        assert not_written == {k for k in layout if k.startswith(("image_mlp.", "text_mlp."))}
        assert layout["image_mlp.layer1.weight"][0] == (4096, 64) and layout["text_mlp.layer1.weight"][0] == (4096, 512)
    else:
        assert not not_written, f"{name}: published keys we do not write: {sorted(not_written)[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_published_checkpoints_load_for_evaluation(name, caplog):
    """A state dict with exactly the published layout (all five) loads into our model sized from it
    alone (no metadata, no CLIP weights file, no dataset), every tensor landing at its key."""
    layout = expand_layout(name)
    sd = as_state_dict(layout)
    # sizes, SIE and the ViT stride come from the checkpoint, not the config
    cfg = cfg_for(name, "MODEL.SIE_CAMERA", "False", "MODEL.STRIDE_SIZE", "[12, 12]")
    with caplog.at_level(logging.INFO, logger="svllreid"):
        model, info = load_state_for_inference(cfg, {"module." + k: v for k, v in sd.items()})
    vit = "vit" in name
    assert info["num_classes"] == 751 and info["model_name"] == ("ViT-B-16" if vit else "RN50")
    assert info["feat_dim"] == (768 + 512 if vit else 2048 + 1024)
    assert info["sie_camera"] == ("cv_embed" in layout) and info["camera_num"] == (6 if "cv_embed" in layout else 1)
    assert info["dataset"] is None and not model.training
    if vit:
        assert model.image_encoder.conv1.stride == ((16, 16) if name == "clipreid_vit" else (12, 12))
    loaded = model.state_dict()
    dropped = {k for k in sd if k not in loaded}
    if name == "svllreid_rn50_SIMCLR":
        assert dropped == {k for k in sd if k.startswith(("image_mlp.", "text_mlp."))}
        line = [r.getMessage() for r in caplog.records if "Training-only parts not loaded" in r.getMessage()]
        assert len(line) == 1 and "image SSL head: mis-shaped image_mlp.layer1.weight" in line[0]
        assert "text SSL head: mis-shaped text_mlp.layer1.weight" in line[0]
    else:
        assert not dropped
    for k in loaded:
        assert k in sd, f"{name}: {k} is in our model but not in the checkpoint"
        assert torch.equal(loaded[k], sd[k]), f"{name}: {k} not loaded from the checkpoint"
    # and the weights file our code would write from it is the published file again
    again = model.published_state_dict()
    assert set(again) == set(sd) - dropped and all(torch.equal(again[k], sd[k]) for k in again)


def test_ssl_heads_have_the_published_names():
    """SimCLR heads and the SimSiam predictor: the published sub-module names and shapes."""
    simclr = expand_layout("svllreid_vit_SIMCLR")
    simsiam = expand_layout("svllreid_vit_SIMSIAM")
    for name, layout, prefixes in (("svllreid_vit_SIMCLR", simclr, ("image_mlp.", "text_mlp.")),
                                   ("svllreid_vit_SIMSIAM", simsiam, ("image_mlp.",))):
        sd = meta_model(name).state_dict()
        for prefix in prefixes:
            ours = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
            assert ours == {k: s for k, (s, _) in layout.items() if k.startswith(prefix)}
    # SimSiam with language SSL keeps its (SimCLR) text head for training, but does not export it
    model = meta_model("svllreid_vit_SIMSIAM")
    assert any(k.startswith("text_mlp.") for k in model.state_dict())
    assert not any(k.startswith("text_mlp.") for k in model.published_state_dict())


# ----------------------------------------------------------------------------- tiny models: parity
DEMO = os.path.join(ROOT, "configs/demo/vit_svllreid_demo.yml")


def _tiny(*opts):
    cfg = load_config(DEMO, list(opts))
    torch.manual_seed(0)
    model = make_model(cfg, num_class=5, camera_num=3, view_num=1).eval()
    x, cam = torch.randn(4, 3, 128, 64), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        ref = model.retrieval_features(x, cam_label=cam)
    return cfg, model, x, cam, ref


def test_retrieval_keys_alone_are_enough(tmp_path, caplog):
    """Only the retrieval path in the file (DDP prefix): same features, one line naming what is not loaded."""
    cfg, model, x, cam, ref = _tiny()
    training_only = ("prompt_learner.", "text_encoder.", "image_mlp.", "text_mlp.", "classifier")
    sd = {"module." + k: v for k, v in model.state_dict().items() if not k.startswith(training_only)}
    path = str(tmp_path / "retrieval_only.pth")
    torch.save(sd, path)
    cfg.defrost()
    cfg.TEST.WEIGHT = path
    from model import load_for_inference
    with caplog.at_level(logging.INFO, logger="svllreid"):
        loaded, info = load_for_inference(cfg)
    lines = [r.getMessage() for r in caplog.records if "Training-only parts not loaded" in r.getMessage()]
    assert len(lines) == 1
    for part in ("text side (prompts, text encoder): absent", "image SSL head: absent", "classifiers"):
        assert part in lines[0]
    assert info["camera_num"] == 3 and info["sie_camera"] and info["feat_dim"] == 128
    with torch.no_grad():
        assert torch.equal(loaded.retrieval_features(x, cam_label=cam), ref)


@pytest.mark.parametrize("ssl_type", ["SIMCLR", "SIMSIAM"])
def test_training_state_and_every_output_round_trip(tmp_path, ssl_type):
    """A last.pth training state loads for evaluation; every tensor of the model, SSL heads included,
    comes back equal (what the published model would compute on the same weights)."""
    cfg, model, x, cam, ref = _tiny("MODEL.SSL_TYPE", ssl_type)
    path = str(tmp_path / "last.pth")
    torch.save({"stage": 2, "epoch": 1, "model": model.state_dict()}, path)
    cfg.defrost()
    cfg.TEST.WEIGHT = path
    from model import load_for_inference
    loaded, info = load_for_inference(cfg)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.ssl_type == ssl_type and info["num_classes"] == 5
    with torch.no_grad():
        assert torch.equal(loaded.retrieval_features(x, cam_label=cam), ref)
        assert torch.equal(loaded.encode_text(torch.arange(5)), model.encode_text(torch.arange(5)))


class _TestSet:
    """Just what the SIE decision reads from a dataset."""

    def __init__(self, cams: int, top_cam: int | None = None):
        top = cams - 1 if top_cam is None else top_cam
        self.query = [("q", 1, 0, 0)]
        self.gallery = [("g", 1, top, 0)]
        self.num_train_cams, self.num_train_vids = cams, 1


def test_sie_decision_rules():
    from model.loading import decide_use_sie
    cfg, model, *_ = _tiny()
    meta_same = {"dataset": "folder", "dataset_root": cfg.DATASETS.ROOT_DIR}
    meta_other = {"dataset": "market1501"}
    assert decide_use_sie(model, cfg, meta_same, _TestSet(3))[0] is True
    assert decide_use_sie(model, cfg, meta_same, _TestSet(4))[0] is False        # camera id 3 does not fit
    assert decide_use_sie(model, cfg, meta_other, _TestSet(3))[0] is False       # another dataset
    assert decide_use_sie(model, cfg, None, _TestSet(3))[0] is True              # no metadata: same camera count
    assert decide_use_sie(model, cfg, None, _TestSet(2))[0] is False             # ... or not
    cfg.defrost()
    cfg.TEST.USE_SIE = "yes"
    assert decide_use_sie(model, cfg, meta_other, _TestSet(3))[0] is True
    cfg.TEST.USE_SIE = "no"
    assert decide_use_sie(model, cfg, meta_same, _TestSet(3)) == (False, "TEST.USE_SIE no")
