"""Stage 2: fine-tune the image encoder (+ vision self-supervision) against frozen text features.

docs/method.md, stage 2: loss = ID + triplet + I2T (img_feature_proj @ text_features.T) + SSL between two
randomly-erased views; WarmupMultiStepLR steps once per epoch; periodic evaluation.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from loss import SimCLRLoss
from solver import rescale_center_grad
from utils.checkpoint import unwrap
from utils.dist import average_gradients
from utils.misc import AverageMeter
from utils.record import NULL_RECORD, TrainingRecord

from .common import (POSITION, autocast, check_finite_loss, eval_mode, make_scaler, progress, restore_rng,
                     restore_train_state, save_train_state, save_weights, set_loader_epoch, to_device)
from .inference import do_inference

logger = logging.getLogger("svllreid")


@torch.no_grad()
def compute_text_features(model: nn.Module, num_classes: int, batch_size: int, device: torch.device
                          ) -> torch.Tensor:
    """Text features of every identity's prompt (frozen in stage 2), (num_classes, proj_dim)."""
    with eval_mode(model) as net:
        feats = []
        for labels in torch.arange(num_classes, device=device).split(batch_size):
            with autocast(device):
                feats.append(net(label=labels, mode="text").float())
    return torch.cat(feats)


def ssl_loss_value(ssl_loss: nn.Module, ssl_out: dict[str, torch.Tensor]) -> torch.Tensor:
    """SimCLR takes the dict of the two embeddings; SimSiam takes (p1, p2, z1, z2)."""
    return ssl_loss(ssl_out) if isinstance(ssl_loss, SimCLRLoss) else ssl_loss(**ssl_out)


def stage2_forward_loss(cfg: Any, model: nn.Module, batch: dict[str, Any], text_features: torch.Tensor | None,
                        loss_fn: Callable, ssl_loss: nn.Module | None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """One stage-2 forward: (total loss, unweighted parts, model outputs).

    ID + triplet (+ I2T against ``text_features``) from ``loss_fn``, plus
    SOLVER.STAGE2.SSL_LOSS_WEIGHT x the SSL loss of the two views when ``ssl_loss`` is given.
    """
    views = (batch["ssl_view1"], batch["ssl_view2"]) if ssl_loss is not None else None
    target = batch["pid"]
    out = model(batch["img"], label=target,
                cam_label=batch["camid"] if cfg.MODEL.SIE_CAMERA else None,
                view_label=batch["viewid"] if cfg.MODEL.SIE_VIEW else None,
                ssl_views=views, mode="stage2")
    i2t = out["img_feature_proj"].float() @ text_features.t() if text_features is not None else None
    loss, parts = loss_fn(out["scores"], out["feats"], target, batch["camid"], i2tscore=i2t)
    if ssl_loss is not None:
        parts["ssl"] = ssl_loss_value(ssl_loss, out["ssl"])
        loss = loss + cfg.SOLVER.STAGE2.SSL_LOSS_WEIGHT * parts["ssl"]
    return loss, parts, out


def _summary(meters: dict[str, AverageMeter], optimizer: torch.optim.Optimizer) -> str:
    m = {k: v.avg for k, v in meters.items()}
    return (f"loss {m['loss']:.3f} (id {m['id']:.3f} tri {m['tri']:.3f} i2t {m['i2t']:.3f} ssl {m['ssl']:.3f}) "
            f"acc {m['acc']:.3f} lr {optimizer.param_groups[0]['lr']:.2e}")


def do_train_stage2(cfg: Any, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None,
                    optimizer: torch.optim.Optimizer, optimizer_center: torch.optim.Optimizer | None,
                    scheduler: Any, loss_fn: Callable, ssl_loss: nn.Module | None, center_criterion: nn.Module | None,
                    num_query: int, num_classes: int, device: torch.device,
                    resume_state: dict[str, Any] | None = None, record: TrainingRecord = NULL_RECORD
                    ) -> dict[str, Any] | None:
    """Run stage 2; returns the metrics of the last evaluation (or None when none ran).

    ``record`` receives the running averages every LOG_PERIOD iterations, the epoch
    averages and the evaluations.
    """
    c2 = cfg.SOLVER.STAGE2
    scaler = make_scaler(device)
    core = unwrap(model)
    use_text = core.prompt_learning and cfg.MODEL.I2T_LOSS_WEIGHT > 0
    use_ssl = cfg.MODEL.USE_SSL and ssl_loss is not None and c2.SSL_LOSS_WEIGHT > 0

    start_epoch = 1
    if resume_state is not None:
        restore_train_state(resume_state, model, optimizer, scheduler, scaler)
        if optimizer_center is not None and "optimizer_center" in resume_state["extra"]:
            optimizer_center.load_state_dict(resume_state["extra"]["optimizer_center"])
        start_epoch = resume_state["epoch"] + 1
        logger.info("Stage 2: resuming at epoch %d", start_epoch)
    # after the resume: the prompts come from the restored weights
    text_features = compute_text_features(model, num_classes, cfg.SOLVER.STAGE1.IMS_PER_BATCH, device) \
        if use_text else None
    if resume_state is not None:
        restore_rng(resume_state)

    meters = {k: AverageMeter() for k in ("loss", "id", "tri", "i2t", "ssl", "acc")}
    results = None
    for epoch in range(start_epoch, c2.MAX_EPOCHS + 1):
        t0, n_seen = time.time(), 0
        for m in meters.values():
            m.reset()
        POSITION.stage, POSITION.epoch = 2, epoch
        with warnings.catch_warnings():   # stepped at epoch start, as published: not a misuse
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            scheduler.step()
        set_loader_epoch(train_loader, cfg.SOLVER.SEED, epoch)
        model.train()
        bar = progress(train_loader, len(train_loader), f"stage2 epoch {epoch}/{c2.MAX_EPOCHS}")
        for it, batch in enumerate(bar, start=1):
            batch = to_device(batch, device)
            target = batch["pid"]
            optimizer.zero_grad(set_to_none=True)
            if optimizer_center is not None:
                optimizer_center.zero_grad(set_to_none=True)
            with autocast(device):
                loss, parts, out = stage2_forward_loss(cfg, model, batch, text_features, loss_fn,
                                                       ssl_loss if use_ssl else None)
            values = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
            check_finite_loss(values, 2, epoch, it)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            if optimizer_center is not None:   # undo the loss weight on the centers' gradient
                average_gradients(center_criterion)
                rescale_center_grad(center_criterion, cfg)
                scaler.step(optimizer_center)
            scaler.update()

            n = target.shape[0]
            n_seen += n
            values["acc"] = (out["scores"][0].argmax(dim=1) == target).float().mean().item()
            for k, v in values.items():
                if k in meters:
                    meters[k].update(v, n)
            bar.set_postfix(loss=f"{meters['loss'].avg:.3f}", acc=f"{meters['acc'].avg:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if it % c2.LOG_PERIOD == 0:
                logger.info("Stage2 epoch[%d] iter[%d] %s", epoch, it, _summary(meters, optimizer))
                record.log(2, epoch, it, step=(epoch - 1) * len(train_loader) + it,
                           lr=optimizer.param_groups[0]["lr"], **{k: m.avg for k, m in meters.items()})
        dt = time.time() - t0
        logger.info("Stage2 epoch %d done in %.1fs (%.1f samples/s): %s", epoch, dt, n_seen / max(dt, 1e-9),
                    _summary(meters, optimizer))
        record.log(2, epoch, kind="epoch", lr=optimizer.param_groups[0]["lr"], seconds=dt,
                   samples_per_s=n_seen / max(dt, 1e-9), **{k: m.avg for k, m in meters.items()})

        if epoch % c2.CHECKPOINT_PERIOD == 0 or epoch == c2.MAX_EPOCHS:
            save_weights(cfg.OUTPUT_DIR, f"{cfg.MODEL.NAME}_{epoch}.pth", model, cfg, stage=2, epoch=epoch)
        if val_loader is not None and (epoch % c2.EVAL_PERIOD == 0 or epoch == c2.MAX_EPOCHS):
            results = do_inference(cfg, model, val_loader, num_query, device)
            record.log_eval(2, epoch, results)
        extra = {"optimizer_center": optimizer_center.state_dict()} if optimizer_center is not None else {}
        save_train_state(cfg.OUTPUT_DIR, 2, epoch, model, optimizer, scheduler, scaler, cfg.dump(), extra)
    return results
