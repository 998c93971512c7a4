"""Optimiser parameter groups and learning-rate schedules against explicit formulas."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from config import load_config
from model.make_model import SVLLReID
from solver import (
    WarmupMultiStepLR,
    create_scheduler,
    create_warmup_multistep,
    make_optimizer_1stage,
    make_optimizer_2stage,
    rescale_center_grad,
)


class PromptLearner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_ctx = nn.Parameter(torch.zeros(3, 4, 8))
        self.register_buffer("token_prefix", torch.zeros(1, 5, 8))


class Dummy(nn.Module):
    """Has the attribute names the real model uses for parameter selection."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.Linear(8, 8)
        self.bottleneck = nn.BatchNorm1d(8)
        self.bottleneck.bias.requires_grad_(False)  # frozen BNNeck bias
        self.classifier = nn.Linear(8, 3, bias=False)
        self.image_mlp = nn.Linear(8, 4)
        self.text_encoder = nn.Linear(8, 8)
        self.prompt_learner = PromptLearner()
        self.text_mlp = nn.Linear(8, 4)
        self.text_encoder.requires_grad_(False)
        self._trainable_at_init = {n: p.requires_grad for n, p in self.named_parameters()}
        self.stage = None

    set_stage = SVLLReID.set_stage     # the model decides what trains; the optimisers follow


def _cfg(*opts):
    return load_config(None, list(opts))


def _group_of(opt: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


# ----------------------------------------------------------------------------- optimisers
@pytest.mark.parametrize("large_fc", [False, True])
def test_stage2_param_groups(large_fc):
    cfg = _cfg("SOLVER.STAGE2.BASE_LR", "0.01", "SOLVER.STAGE2.BIAS_LR_FACTOR", "2.0",
               "SOLVER.STAGE2.WEIGHT_DECAY", "0.001", "SOLVER.STAGE2.WEIGHT_DECAY_BIAS", "0.0",
               "SOLVER.STAGE2.LARGE_FC_LR", str(large_fc))
    model = Dummy()
    model.set_stage(2)
    opt, opt_center = make_optimizer_2stage(cfg, model)
    assert isinstance(opt, torch.optim.Adam) and opt_center is None
    groups = _group_of(opt)
    expected_names = {"image_encoder.weight", "image_encoder.bias", "bottleneck.weight",
                      "classifier.weight", "image_mlp.weight", "image_mlp.bias"}
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if id(p) in groups} == expected_names
    for name, p in named.items():
        if name.startswith(("text_encoder", "prompt_learner")):
            assert not p.requires_grad  # frozen in stage 2, as published
        if id(p) not in groups:
            continue
        lr, wd = 0.01, 0.001
        if "bias" in name:
            lr, wd = 0.02, 0.0
        if large_fc and "classifier" in name:
            lr = 0.02
        assert groups[id(p)]["lr"] == pytest.approx(lr) and groups[id(p)]["weight_decay"] == wd, name
    distinct = {(g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert len(opt.param_groups) == len(distinct) == (3 if large_fc else 2)


def test_stage2_optimizer_names_and_center_optimizer():
    from loss import CenterLoss

    center = CenterLoss(3, 8)
    cfg = _cfg("SOLVER.STAGE2.OPTIMIZER_NAME", "SGD", "SOLVER.STAGE2.MOMENTUM", "0.8",
               "SOLVER.STAGE2.CENTER_LR", "0.3")
    opt, opt_center = make_optimizer_2stage(cfg, _in_stage(Dummy(), 2), center)
    assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0.8 for g in opt.param_groups)
    assert isinstance(opt_center, torch.optim.SGD)
    assert opt_center.param_groups[0]["lr"] == 0.3
    assert opt_center.param_groups[0]["params"][0] is center.centers
    opt, _ = make_optimizer_2stage(_cfg("SOLVER.STAGE2.OPTIMIZER_NAME", "AdamW"), _in_stage(Dummy(), 2))
    assert isinstance(opt, torch.optim.AdamW)


@pytest.mark.parametrize("train_mlp", [False, True])
def test_stage1_only_prompt_learner(train_mlp):
    cfg = _cfg("SOLVER.STAGE1.BASE_LR", "0.005", "SOLVER.STAGE1.WEIGHT_DECAY", "0.0001",
               "MODEL.TRAIN_TEXT_MLP_STAGE1", str(train_mlp))
    model = Dummy()
    model.set_stage(1, train_text_mlp=train_mlp)
    opt = make_optimizer_1stage(cfg, model)
    assert isinstance(opt, torch.optim.Adam)
    got = {n for n, p in model.named_parameters() if id(p) in _group_of(opt)}
    expected = {"prompt_learner.cls_ctx"} | ({"text_mlp.weight", "text_mlp.bias"} if train_mlp else set())
    assert got == expected
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["lr"] == 0.005 and opt.param_groups[0]["weight_decay"] == 0.0001


def _in_stage(model, stage):
    model.set_stage(stage)
    return model


def test_optimisers_refuse_a_model_not_set_to_their_stage():
    with pytest.raises(ValueError, match=r"set_stage\(2\)"):
        make_optimizer_2stage(_cfg(), Dummy())
    with pytest.raises(ValueError, match=r"set_stage\(1\)"):
        make_optimizer_1stage(_cfg(), _in_stage(Dummy(), 2))


def test_rescale_center_grad():
    from loss import CenterLoss

    center = CenterLoss(3, 4)
    center.centers.grad = torch.ones(3, 4) * 0.002
    rescale_center_grad(center, _cfg("SOLVER.STAGE2.CENTER_LOSS_WEIGHT", "0.0005"))
    assert torch.allclose(center.centers.grad, torch.full((3, 4), 4.0))


# ----------------------------------------------------------------------------- WarmupMultiStepLR
def _sgd(lrs=(1.0, 0.5)) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=lrs[0])


def _ref_multistep(base, epoch, milestones, gamma, wf, wi, method):
    factor = 1.0
    if epoch < wi:
        factor = wf if method == "constant" else wf * (1 - epoch / wi) + epoch / wi
    passed = len([m for m in milestones if m <= epoch])
    return base * factor * gamma ** passed


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_warmup_multistep_matches_formula(method):
    milestones, gamma, wf, wi = [5, 8], 0.1, 0.1, 3
    opt = _sgd()
    sched = WarmupMultiStepLR(opt, milestones, gamma, wf, wi, method)
    for epoch in range(12):
        if epoch:
            opt.step()
            sched.step()
        for g, base in zip(opt.param_groups, (1.0, 0.5)):
            assert g["lr"] == pytest.approx(_ref_multistep(base, epoch, milestones, gamma, wf, wi, method)), epoch


def test_warmup_multistep_from_config_and_errors():
    cfg = _cfg("SOLVER.STAGE2.STEPS", "(2, 4)", "SOLVER.STAGE2.WARMUP_ITERS", "2",
               "SOLVER.STAGE2.WARMUP_FACTOR", "0.5", "SOLVER.STAGE2.WARMUP_METHOD", "constant")
    opt = _sgd((2.0,))
    sched = create_warmup_multistep(cfg.SOLVER.STAGE2, opt)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 1.0, 0.2, 0.2, 0.02, 0.02])
    with pytest.raises(ValueError, match="increasing"):
        WarmupMultiStepLR(_sgd(), [8, 5])
    with pytest.raises(ValueError, match="warmup_method"):
        WarmupMultiStepLR(_sgd(), [5], warmup_method="cosine")


def test_warmup_multistep_state_dict_resume():
    def make():
        model = nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
        return model, opt, WarmupMultiStepLR(opt, [3, 6], 0.1, 0.1, 2, "linear")

    _, opt_a, sched_a = make()
    for _ in range(4):
        opt_a.step()
        sched_a.step()
    buf = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)  # weights_only default: the state must be plain data

    _, opt_b, sched_b = make()  # fresh: lr back at epoch 0
    opt_b.load_state_dict(state["opt"])
    sched_b.load_state_dict(state["sched"])
    assert sched_b.last_epoch == 4
    for _ in range(5):
        for opt, sched in ((opt_a, sched_a), (opt_b, sched_b)):
            opt.step()
            sched.step()
        assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
        assert sched_b.get_last_lr() == sched_a.get_last_lr()
    assert opt_b.param_groups[0]["lr"] == pytest.approx(1e-2)  # epoch 9: past both milestones


# ----------------------------------------------------------------------------- cosine (stage 1)
def test_cosine_scheduler_matches_closed_form():
    base, lr_min, w_init, w_ep, max_ep = 3.5e-4, 1e-6, 1e-5, 5, 20
    cfg = _cfg("SOLVER.STAGE1.BASE_LR", str(base), "SOLVER.STAGE1.LR_MIN", str(lr_min),
               "SOLVER.STAGE1.WARMUP_LR_INIT", str(w_init), "SOLVER.STAGE1.WARMUP_EPOCHS", str(w_ep),
               "SOLVER.STAGE1.MAX_EPOCHS", str(max_ep))
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=base)
    sched = create_scheduler(cfg.SOLVER.STAGE1, opt)

    def lr_at(epoch: int) -> float:
        sched.step(epoch)
        return opt.param_groups[0]["lr"]

    def cosine(t: int) -> float:
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / max_ep))

    assert lr_at(0) == pytest.approx(w_init)
    assert lr_at(2) == pytest.approx(w_init + 2 * (base - w_init) / w_ep)
    assert lr_at(w_ep) == pytest.approx(cosine(w_ep))  # warm-up end: cosine measured from epoch 0
    assert lr_at(max_ep - 1) == pytest.approx(cosine(max_ep - 1))
    assert lr_at(max_ep) == pytest.approx(lr_min)
