"""Scheduler builders from a stage config node (``cfg.SOLVER.STAGE1`` / ``cfg.SOLVER.STAGE2``)."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler

from .lr_scheduler import WarmupMultiStepLR

__all__ = ["create_scheduler", "create_warmup_multistep"]


def create_scheduler(cfg_stage, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
    """Stage-1 cosine schedule with linear warm-up (timm), stepped with ``.step(epoch)``.

    lr(t) = WARMUP_LR_INIT + t * (BASE - WARMUP_LR_INIT) / WARMUP_EPOCHS for t < WARMUP_EPOCHS,
    else LR_MIN + (BASE - LR_MIN) * (1 + cos(pi * t / MAX_EPOCHS)) / 2 (one cycle, the
    warm-up is not a prefix: the cosine is measured from epoch 0), LR_MIN from MAX_EPOCHS on.
    ``cfg_stage`` is ``cfg.SOLVER.STAGE1``.
    """
    return CosineLRScheduler(
        optimizer,
        t_initial=cfg_stage.MAX_EPOCHS,
        lr_min=cfg_stage.LR_MIN,
        warmup_lr_init=cfg_stage.WARMUP_LR_INIT,
        warmup_t=cfg_stage.WARMUP_EPOCHS,
        cycle_limit=1,
        t_in_epochs=True,
    )


def create_warmup_multistep(cfg_stage, optimizer: torch.optim.Optimizer) -> WarmupMultiStepLR:
    """Stage-2 WarmupMultiStepLR from ``cfg.SOLVER.STAGE2`` (STEPS, GAMMA, WARMUP_*)."""
    return WarmupMultiStepLR(
        optimizer,
        milestones=cfg_stage.STEPS,
        gamma=cfg_stage.GAMMA,
        warmup_factor=cfg_stage.WARMUP_FACTOR,
        warmup_iters=cfg_stage.WARMUP_ITERS,
        warmup_method=cfg_stage.WARMUP_METHOD,
    )
