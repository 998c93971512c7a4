"""Optimisers for the two training stages, with parameters grouped by hyper-parameters."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn as nn

from config import OPTIMIZERS

__all__ = [
    "build_optimizer",
    "group_params",
    "make_optimizer_1stage",
    "make_optimizer_2stage",
    "rescale_center_grad",
]



def group_params(
    named: Iterable[tuple[str, nn.Parameter, float, float]]
) -> list[dict]:
    """Merge ``(name, param, lr, weight_decay)`` into one param group per (lr, wd) pair.

    Groups keep first-seen order and carry the parameter names under ``'param_names'``
    (used only for inspection/logging).
    """
    groups: OrderedDict[tuple[float, float], dict] = OrderedDict()
    for name, param, lr, wd in named:
        group = groups.setdefault((lr, wd), {"params": [], "param_names": [], "lr": lr, "weight_decay": wd})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(
    name: str, param_groups: list[dict], lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD(momentum); per-group 'lr' and 'weight_decay' take precedence."""
    if not param_groups:
        raise ValueError("build_optimizer: no trainable parameters selected")
    if name == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "Adam":
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"OPTIMIZER_NAME {name!r} not in {OPTIMIZERS}")


def _trainable(model: nn.Module, stage: int) -> list[tuple[str, nn.Parameter]]:
    """The parameters that require grad; ``model.set_stage(stage)`` decides which those are."""
    current = getattr(model, "stage", None)
    if current != stage:
        raise ValueError(f"stage-{stage} optimiser for a model in stage {current}: call model.set_stage({stage}) "
                         "first (it decides what trains)")
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def make_optimizer_1stage(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Stage 1: what ``set_stage(1)`` left trainable (the prompts, and the text SSL MLP when
    MODEL.TRAIN_TEXT_MLP_STAGE1), lr/wd from SOLVER.STAGE1."""
    s1 = cfg.SOLVER.STAGE1
    named = [(name, p, s1.BASE_LR, s1.WEIGHT_DECAY) for name, p in _trainable(model, 1)]
    return build_optimizer(s1.OPTIMIZER_NAME, group_params(named), s1.BASE_LR, s1.WEIGHT_DECAY, s1.MOMENTUM)


def _stage2_hparams(name: str, s2) -> tuple[float, float]:
    """(lr, weight decay) of one stage-2 parameter."""
    lr, wd = s2.BASE_LR, s2.WEIGHT_DECAY
    if "bias" in name:
        lr, wd = s2.BASE_LR * s2.BIAS_LR_FACTOR, s2.WEIGHT_DECAY_BIAS
    if s2.LARGE_FC_LR and "classifier" in name:
        lr = s2.BASE_LR * 2  # as published: overrides the bias factor for classifier params
    return lr, wd


def make_optimizer_2stage(
    cfg, model: nn.Module, center_criterion: nn.Module | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """Stage 2: what ``set_stage(2)`` left trainable (all but the text side).

    Bias parameters get BASE_LR x BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS; with LARGE_FC_LR,
    'classifier' parameters get 2 x BASE_LR. The center loss, when given, gets its own
    SGD(lr=CENTER_LR); otherwise the second return value is None.
    """
    s2 = cfg.SOLVER.STAGE2
    named = [(name, p, *_stage2_hparams(name, s2)) for name, p in _trainable(model, 2)]
    optimizer = build_optimizer(s2.OPTIMIZER_NAME, group_params(named), s2.BASE_LR, s2.WEIGHT_DECAY, s2.MOMENTUM)
    optimizer_center = None
    if center_criterion is not None:
        optimizer_center = torch.optim.SGD(center_criterion.parameters(), lr=s2.CENTER_LR)
    return optimizer, optimizer_center


def rescale_center_grad(center_criterion: nn.Module, cfg) -> None:
    """Divide the centre gradients by SOLVER.STAGE2.CENTER_LOSS_WEIGHT before their step.

    The total loss scales the center loss by its weight; undoing that makes the centre
    update independent of the weight (the published code read a key that does not exist).
    """
    weight = cfg.SOLVER.STAGE2.CENTER_LOSS_WEIGHT
    if weight == 0:
        raise ValueError("rescale_center_grad: SOLVER.STAGE2.CENTER_LOSS_WEIGHT is 0")
    for p in center_criterion.parameters():
        if p.grad is not None:
            p.grad.mul_(1.0 / weight)
