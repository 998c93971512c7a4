"""Stage 2: fine-tune the image encoder (+ vision self-supervision) against frozen text features.

docs/method.md, stage 2: loss = ID + triplet + I2T (img_feature_proj @ text_features.T) + SSL between two
randomly-erased views; WarmupMultiStepLR steps once per epoch; periodic evaluation.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from datasets.make_dataloader import Loaders
from loss import SimCLRLoss
from solver import rescale_center_grad
from utils.checkpoint import unwrap
from utils.dist import average_gradients
from utils.record import NULL_RECORD, TrainingRecord

from .amp import autocast, make_scaler, optimizer_step
from .batches import device_transform_of, eval_mode, set_loader_epoch, to_device
from .compiled import fixed_batch_encode, log_first_step
from .inference import do_inference
from .meters import EpochMeters
from .progress import progress
from .train_state import is_due, restore_rng, resume_stage, save_epoch_weights, save_train_state

logger = logging.getLogger("svllreid")


@torch.no_grad()
def compute_text_features(model: nn.Module, num_classes: int, batch_size: int, device: torch.device
                          ) -> torch.Tensor:
    """Text features of every identity's prompt (frozen in stage 2), (num_classes, proj_dim)."""
    encode = fixed_batch_encode(lambda net, b: net(label=b["label"], mode="text"), model, batch_size,
                                "stage-2 text-feature batch")
    with eval_mode(model) as net:
        feats = []
        for labels in torch.arange(num_classes, device=device).split(batch_size):
            with autocast(device):
                feats.append(encode(net, {"label": labels}).float())
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


def _summary(m: EpochMeters, optimizer: torch.optim.Optimizer) -> str:
    return (f"loss {m['loss']:.3f} (id {m['id']:.3f} tri {m['tri']:.3f} i2t {m['i2t']:.3f} ssl {m['ssl']:.3f}) "
            f"acc {m['acc']:.3f} lr {optimizer.param_groups[0]['lr']:.2e}")


@dataclasses.dataclass
class Stage2Criteria:
    """What stage 2 minimises: ``loss_fn`` (ID + triplet [+ center] [+ I2T], from ``loss.make_loss``),
    the SSL loss (None: none), and the center loss with its own optimiser (both None without it)."""
    loss_fn: Callable
    ssl_loss: nn.Module | None = None
    center_criterion: nn.Module | None = None
    optimizer_center: torch.optim.Optimizer | None = None


def do_train_stage2(cfg: Any, model: nn.Module, data: Loaders, optimizer: torch.optim.Optimizer, scheduler: Any,
                    criteria: Stage2Criteria, device: torch.device, *,
                    resume_state: dict[str, Any] | None = None, record: TrainingRecord = NULL_RECORD
                    ) -> dict[str, Any] | None:
    """Run stage 2 on ``data.train_stage2``, evaluating on ``data.val`` (None: no evaluation);
    returns the metrics of the last evaluation (or None when none ran).

    ``record`` receives the running averages every LOG_PERIOD iterations, the epoch
    averages and the evaluations.
    """
    c2 = cfg.SOLVER.STAGE2
    train_loader, val_loader = data.train_stage2, data.val
    loss_fn, ssl_loss = criteria.loss_fn, criteria.ssl_loss
    center_criterion, optimizer_center = criteria.center_criterion, criteria.optimizer_center
    scaler = make_scaler(device)
    core = unwrap(model)
    use_text = core.prompt_learning and cfg.MODEL.I2T_LOSS_WEIGHT > 0
    use_ssl = cfg.MODEL.USE_SSL and ssl_loss is not None and c2.SSL_LOSS_WEIGHT > 0

    start_epoch = resume_stage(2, resume_state, model, optimizer, scheduler, scaler)
    if resume_state is not None and optimizer_center is not None and "optimizer_center" in resume_state["extra"]:
        optimizer_center.load_state_dict(resume_state["extra"]["optimizer_center"])
    # after the resume: the prompts come from the restored weights
    text_features = compute_text_features(model, data.num_classes, cfg.SOLVER.STAGE1.IMS_PER_BATCH, device) \
        if use_text else None
    if resume_state is not None:
        restore_rng(resume_state)

    def step_centers() -> None:   # undo the loss weight on the centers' gradient
        average_gradients(center_criterion)
        rescale_center_grad(center_criterion, cfg)
        scaler.step(optimizer_center)

    meters = EpochMeters(2, ("loss", "id", "tri", "i2t", "ssl", "acc"), record, device)
    meters.plan(len(train_loader), start_epoch, c2.MAX_EPOCHS)
    results, eval_seconds = None, None
    prepare = device_transform_of(train_loader)   # uint8 -> normalised float, erasing, on the device
    for epoch in range(start_epoch, c2.MAX_EPOCHS + 1):
        meters.start(epoch)
        # the run's ETA: the evaluations still to come, once one has been timed
        evals_left = 0 if val_loader is None else sum(
            is_due(e, c2.EVAL_PERIOD, c2.MAX_EPOCHS) for e in range(epoch, c2.MAX_EPOCHS + 1))
        meters.later_seconds = evals_left * (eval_seconds or 0.0)
        meters.untimed = "the evaluations" if evals_left and eval_seconds is None else ""
        with warnings.catch_warnings():   # stepped at epoch start, as published: not a misuse
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            scheduler.step()
        set_loader_epoch(train_loader, cfg.SOLVER.SEED, epoch)
        model.train()
        bar = progress(train_loader, len(train_loader), f"stage2 epoch {epoch}/{c2.MAX_EPOCHS}")
        for it, batch in enumerate(log_first_step(bar, model, "stage-2 step", device), start=1):
            batch = to_device(batch, device, prepare)
            target = batch["pid"]
            optimizer.zero_grad(set_to_none=True)
            if optimizer_center is not None:
                optimizer_center.zero_grad(set_to_none=True)
            with autocast(device):
                loss, parts, out = stage2_forward_loss(cfg, model, batch, text_features, loss_fn,
                                                       ssl_loss if use_ssl else None)
            optimizer_step(scaler, loss, optimizer, after_step=step_centers if optimizer_center is not None else None)
            acc = (out["scores"][0].argmax(dim=1) == target).float().mean()
            meters.update({"loss": loss, **parts, "acc": acc}, target.shape[0])   # read once per log period

            if it % c2.LOG_PERIOD == 0:
                meters.read()
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{meters['loss']:.3f}", acc=f"{meters['acc']:.3f}", lr=f"{lr:.2e}")
                logger.info("Stage2 epoch[%d] iter[%d/%d] %s, %s", epoch, it, len(train_loader),
                            _summary(meters, optimizer), meters.timing())
                meters.record_period(it, step=(epoch - 1) * len(train_loader) + it, lr=lr)
        dt = meters.end_epoch()
        logger.info("Stage2 epoch %d/%d done in %.1fs (%.1f samples/s): %s", epoch, c2.MAX_EPOCHS, dt,
                    meters.samples / max(dt, 1e-9), _summary(meters, optimizer))
        meters.record_epoch(lr=optimizer.param_groups[0]["lr"], seconds=dt,
                            samples_per_s=meters.samples / max(dt, 1e-9))

        save_epoch_weights(cfg, model, 2, epoch)
        if val_loader is not None and is_due(epoch, c2.EVAL_PERIOD, c2.MAX_EPOCHS):
            t0 = time.time()
            results = do_inference(cfg, model, val_loader, data.num_query, device)
            eval_seconds = time.time() - t0
            record.log_eval(2, epoch, results)
        extra = {"optimizer_center": optimizer_center.state_dict()} if optimizer_center is not None else {}
        save_train_state(cfg.OUTPUT_DIR, 2, epoch, model, optimizer, scheduler, scaler, cfg.dump(), extra)
    return results
