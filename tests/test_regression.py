"""Pinned numbers: one seeded stage-1 step and one stage-2 step on the tiny synthetic set.

Any change to the numerics anywhere on the training path (model, prompts, augmentations,
losses, optimisers, data pipeline) moves these values, so it shows up here at once.
When a change is meant to alter them, re-pin with the printed values and say why in the
commit message.
"""
import pytest
import torch

from datasets import make_dataloader
from loss import SimCLRLoss, SupConLoss, make_loss, make_ssl_loss
from model import make_model
from processor.batches import device_transform_of, to_device
from processor.processor_stage1 import cache_image_features
from processor.processor_stage2 import compute_text_features, stage2_forward_loss
from solver import make_optimizer_1stage, make_optimizer_2stage
from tests.helpers import tiny_cfg
from utils.misc import set_seed

PINNED = {
    "stage1": {"i2t": 2.881927490234375, "t2i": 4.325069904327393, "ssl": 0.4812147319316864},
    "stage2": {"id": 4.159032821655273, "tri": 2.8399055004119873, "i2t": 7.105831623077393,
               "ssl": 2.786611557006836},
    "weights_abs_sum": 27721.608791769053,
}


def _one_step_each(cfg):
    device = torch.device("cpu")
    set_seed(cfg.SOLVER.SEED)
    data = make_dataloader(cfg)
    model = make_model(cfg, data.num_classes, data.camera_num, data.view_num)
    got = {}

    model.set_stage(1, train_text_mlp=False)
    opt1 = make_optimizer_1stage(cfg, model)
    feats, labels = cache_image_features(model, data.train_stage1, device)
    idx = torch.arange(min(12, labels.numel()))
    model.eval()
    model.prompt_learner.train()
    model.text_mlp.train()
    out = model(label=labels[idx], mode="stage1")
    supcon, simclr = SupConLoss(), SimCLRLoss(temperature=cfg.MODEL.SSL_TEMPERATURE, gather=False)
    text = out["text_features"]
    parts = {"i2t": supcon(feats[idx], text, labels[idx], labels[idx]),
             "t2i": supcon(text, feats[idx], labels[idx], labels[idx]), "ssl": simclr(out["ssl"])}
    loss = parts["i2t"] + parts["t2i"] + cfg.SOLVER.STAGE1.SSL_LOSS_WEIGHT * parts["ssl"]
    opt1.zero_grad()
    loss.backward()
    opt1.step()
    got["stage1"] = {k: v.item() for k, v in parts.items()}

    model.set_stage(2)
    loss_fn, center = make_loss(cfg, data.num_classes, feat_dim=model.feature_dims[0])
    opt2, _ = make_optimizer_2stage(cfg, model, center)
    text_features = compute_text_features(model, data.num_classes, 16, device)
    model.train()
    batch = to_device(next(iter(data.train_stage2)), device, device_transform_of(data.train_stage2))
    loss, parts, _ = stage2_forward_loss(cfg, model, batch, text_features, loss_fn, make_ssl_loss(cfg))
    opt2.zero_grad()
    loss.backward()
    opt2.step()
    got["stage2"] = {k: v.item() for k, v in parts.items()}
    got["weights_abs_sum"] = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    return got


def test_one_step_of_each_stage_is_pinned(tiny_root, tmp_path):
    got = _one_step_each(tiny_cfg(tiny_root, tmp_path))
    print("pinned values now:", got)
    assert got["stage1"].keys() == PINNED["stage1"].keys() and got["stage2"].keys() == PINNED["stage2"].keys()
    for stage in ("stage1", "stage2"):
        for k, v in PINNED[stage].items():
            assert got[stage][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (stage, k)
    assert got["weights_abs_sum"] == pytest.approx(PINNED["weights_abs_sum"], rel=1e-6)
