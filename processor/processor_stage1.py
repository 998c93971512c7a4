"""Stage 1: learn the identity prompts with frozen encoders (+ language self-supervision).

docs/method.md, stage 1: image features are computed once (eval mode, no grad, test transforms); each
epoch shuffles them into batches; loss = SupCon(i->t) + SupCon(t->i)
+ SSL_LOSS_WEIGHT x SimCLR(two augmented copies of each unique prompt).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from datasets.sampler import epoch_seed
from loss import SimCLRLoss, SupConLoss
from utils.checkpoint import unwrap
from utils.record import NULL_RECORD, TrainingRecord

from .amp import autocast, make_scaler, optimizer_step
from .batches import encode_loader, host_to_device
from .compiled import fixed_batch_encode, log_first_step
from .meters import EpochMeters
from .progress import progress
from .train_state import restore_rng, resume_stage, save_epoch_weights, save_train_state

logger = logging.getLogger("svllreid")


def cache_image_features(model: nn.Module, loader: DataLoader, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected CLS features and labels of every training image, in dataset order.

    Eval mode (BatchNorm running statistics, see docs/fixes.md), no grad, sharded under DDP.
    """
    encode = fixed_batch_encode(lambda net, b: net(b["img"], mode="image_proj"), model, loader.batch_size,
                                "stage-1 feature-caching batch")
    feats, labels, _ = encode_loader(model, loader, device, encode, "stage1: caching image features")
    return feats, labels


def set_stage1_modes(model: nn.Module) -> None:
    """Encoders in eval mode; the prompt learner and text SSL head train (BN batch statistics)."""
    model.eval()
    core = unwrap(model)
    core.prompt_learner.train()
    if getattr(core, "text_mlp", None) is not None:
        core.text_mlp.train()


def stage1_forward_loss(model: nn.Module, image_features: torch.Tensor, target: torch.Tensor, supcon: nn.Module,
                        simclr: nn.Module, ssl_weight: float, device: torch.device,
                        unique_target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One stage-1 forward: (total loss, unweighted parts).

    SupCon(i->t) + SupCon(t->i) between the cached ``image_features`` and the text features of
    the ``target`` prompts (the model under autocast, the losses in float32), plus
    ``ssl_weight`` x SimCLR of the augmented prompts when the model gives them.
    ``unique_target``: ``torch.unique(target)`` when the caller has it (computed on the host, it
    spares the device a synchronisation per step).
    """
    if unique_target is not None:   # its size varies per batch: one compiled graph for every size
        torch._dynamo.maybe_mark_dynamic(unique_target, 0)
    with autocast(device):
        out = model(label=target, mode="stage1", unique_label=unique_target)
    text_f = out["text_features"].float()
    parts = {"i2t": supcon(image_features, text_f, target, target),
             "t2i": supcon(text_f, image_features, target, target)}
    loss = parts["i2t"] + parts["t2i"]
    if ssl_weight and out["ssl"] is not None:
        parts["ssl"] = simclr(out["ssl"])
        loss = loss + ssl_weight * parts["ssl"]
    return loss, parts


def do_train_stage1(cfg: Any, model: nn.Module, train_loader_stage1: DataLoader,
                    optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                    resume_state: dict[str, Any] | None = None, record: TrainingRecord = NULL_RECORD) -> None:
    """Run stage 1 from epoch 1, or from the epoch after ``resume_state['epoch']``; ``record`` gets the metrics."""
    c1 = cfg.SOLVER.STAGE1
    # every rank trains on the same prompt batches: SimCLR negatives stay local
    supcon, simclr = SupConLoss(), SimCLRLoss(temperature=cfg.MODEL.SSL_TEMPERATURE, gather=False)
    scaler = make_scaler(device)
    ssl_weight = c1.SSL_LOSS_WEIGHT if cfg.MODEL.USE_SSL_STAGE1 else 0.0

    start_epoch = resume_stage(1, resume_state, model, optimizer, scheduler, scaler)
    if resume_state is not None and start_epoch > c1.MAX_EPOCHS:
        return

    image_features, labels = cache_image_features(model, train_loader_stage1, device)
    num_image, batch_size = labels.shape[0], c1.IMS_PER_BATCH
    num_batches = (num_image + batch_size - 1) // batch_size
    logger.info("Stage 1: %d cached image features, %d batches of <= %d per epoch, %d epochs",
                num_image, num_batches, batch_size, c1.MAX_EPOCHS)
    host_labels = labels.cpu()
    if resume_state is not None:
        restore_rng(resume_state)

    meters = EpochMeters(1, ("loss", "i2t", "t2i", "ssl"), record, device)
    meters.plan(num_batches, start_epoch, c1.MAX_EPOCHS)
    meters.untimed = "stage 2"
    for epoch in range(start_epoch, c1.MAX_EPOCHS + 1):
        meters.start(epoch)
        scheduler.step(epoch)
        set_stage1_modes(model)
        # the epoch's order from (seed, epoch): identical on every rank and on resume
        gen = torch.Generator().manual_seed(epoch_seed(cfg.SOLVER.SEED, epoch))
        order = torch.randperm(num_image, generator=gen)
        bar = progress(order.split(batch_size), num_batches, f"stage1 epoch {epoch}/{c1.MAX_EPOCHS}")
        for it, idx in enumerate(log_first_step(bar, model, "stage-1 step", device), start=1):
            # indices and unique labels from the host copies: no device sync (torch.unique on the device has one)
            unique_target = host_to_device(torch.unique(host_labels[idx]), device)
            idx = host_to_device(idx, device)
            target, img_f = labels[idx], image_features[idx]
            optimizer.zero_grad(set_to_none=True)
            loss, parts = stage1_forward_loss(model, img_f, target, supcon, simclr, ssl_weight, device,
                                              unique_target)
            optimizer_step(scaler, loss, optimizer)
            meters.update({"loss": loss, **parts}, target.shape[0])   # read (and checked) once per log period

            if it % c1.LOG_PERIOD == 0 or it == num_batches:
                meters.read()
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{meters['loss']:.3f}", lr=f"{lr:.2e}")
                logger.info("Stage1 epoch[%d] iter[%d/%d] loss %.3f (i2t %.3f, t2i %.3f, ssl %.3f) lr %.2e, %s",
                            epoch, it, num_batches, meters["loss"], meters["i2t"], meters["t2i"], meters["ssl"], lr,
                            meters.timing())
                meters.record_period(it, step=(epoch - 1) * num_batches + it, lr=lr)
        dt = meters.end_epoch()
        logger.info("Stage1 epoch %d/%d done in %.1fs (%.0f samples/s)", epoch, c1.MAX_EPOCHS, dt,
                    num_image / max(dt, 1e-9))
        meters.record_epoch(lr=optimizer.param_groups[0]["lr"], seconds=dt)
        save_epoch_weights(cfg, model, 1, epoch)
        save_train_state(cfg.OUTPUT_DIR, 1, epoch, model, optimizer, scheduler, scaler, cfg.dump())
