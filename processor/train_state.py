"""Training state and weights on disk: ``last.pth`` (resume), the weights files and their metadata."""
from __future__ import annotations

import glob
import logging
import os
from typing import Any

import torch
import torch.nn as nn

from config.resume import check_train_state
from datasets.bases import dataset_change
from model.loading import checkpoint_metadata
from utils.checkpoint import (
    WEIGHTS_HASH_KEY,
    CheckpointError,
    load_file,
    load_model_weights,
    model_state,
    read_metadata,
    save_atomic,
    unwrap,
    write_metadata,
)
from utils.dist import all_gather_object, get_rank, get_world_size, is_main_process
from utils.fileio import ctrl_c_deferred
from utils.misc import rng_state, set_rng_state
from utils.run_dir import LAST_CHECKPOINT, RunError

from .amp import load_scaler_state
from .position import POSITION

__all__ = ["save_train_state", "restore_rng", "load_train_state", "check_same_data", "restore_train_state",
           "save_weights",
           "resume_stage", "is_due", "save_epoch_weights"]

logger = logging.getLogger("svllreid")


def save_train_state(output_dir: str, stage: int, epoch: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                     config: str, extra: dict[str, Any] | None = None) -> None:
    """Write ``OUTPUT_DIR/last.pth`` atomically (called on every rank; rank 0 writes).

    The RNG states of all ranks are kept so that each rank resumes its own streams;
    ``config`` (the run's YAML dump) records what produced the state. Non-finite weights
    are never written.
    """
    rngs = all_gather_object(rng_state())
    if not is_main_process():
        return
    weights = model_state(model)
    state = {"stage": stage, "epoch": epoch, "model": weights, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
             "config": config, "extra": extra or {},
             # what the run trains on (datasets.bases.dataset_identity): --resume checks it (check_same_data)
             "data_identity": getattr(unwrap(model), "data_identity", None)}
    with ctrl_c_deferred():   # a Ctrl-C here stops the run after the save, with POSITION telling so
        save_atomic(state, os.path.join(output_dir, LAST_CHECKPOINT), check_finite=weights)
        POSITION.saved = (stage, epoch)


def restore_rng(state: dict[str, Any]) -> None:
    """This rank's RNG streams from a saved state (rank 0's when the world size changed)."""
    rngs = state["rng"]
    set_rng_state(rngs[get_rank()] if len(rngs) == get_world_size() else rngs[0])


def load_train_state(output_dir: str, cfg: Any = None) -> dict[str, Any] | None:
    """The saved training state, or None when the run has none yet.

    With ``cfg`` (the run's config) the state must belong to that run
    (:func:`config.resume.check_train_state`). ``state['source']`` is the file's path.
    """
    path = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(path):
        return None
    state = load_file(path, weights_only=True)
    if not (isinstance(state, dict) and {"stage", "epoch", "model", "optimizer"} <= set(state)):
        raise RunError(f"{path} is not a training state written by train_svllreid.py (a weights-only "
                       "checkpoint?); --resume needs the last.pth of a run")
    if cfg is not None:
        check_train_state(state, cfg, path)
    state["source"] = path
    return state


def check_same_data(state: dict[str, Any], identity: dict[str, Any], output_dir: str) -> None:
    """Refuse to resume a run on other data than it began on (regenerated or replaced at the same
    path): ``identity`` (:func:`datasets.bases.dataset_identity` of the data now) against the one
    saved in ``last.pth``, or, for a ``last.pth`` of an older version, in the metadata beside the
    run's weights files. The one-line :class:`RunError` says what differs
    (:func:`datasets.bases.dataset_change`). Nothing saved: nothing to check."""
    saved = state.get("data_identity") or _metadata_identity(output_dir)
    change = dataset_change(saved, identity)
    if change:
        raise RunError(f"{state.get('source', LAST_CHECKPOINT)} was written on other data than the data now at "
                       f"DATASETS.ROOT_DIR ({change}): --resume continues a run only on the data it began on; put "
                       "that data back (DATASETS.ROOT_DIR may point to where it is now), or start over with "
                       "--overwrite")


def _metadata_identity(output_dir: str) -> dict[str, Any] | None:
    """The dataset identity in the metadata beside a weights file of the run in ``output_dir``, if any."""
    for weights in sorted(glob.glob(os.path.join(glob.escape(output_dir), "*.pth"))):
        if os.path.basename(weights) == LAST_CHECKPOINT:
            continue
        try:
            meta = read_metadata(weights)
        except CheckpointError:
            continue
        if meta and meta.get("dataset_identity"):
            return meta["dataset_identity"]
    return None


def restore_train_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, scaler: torch.amp.GradScaler) -> None:
    """Put model, optimiser, scheduler and scaler back to a saved state.

    The RNG states are restored separately, with :func:`restore_rng`,
    right before the first resumed epoch: work done in between (feature caching,
    loader start-up) draws random numbers too.
    """
    source = state.get("source", LAST_CHECKPOINT)
    load_model_weights(model, state["model"], source)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    load_scaler_state(scaler, state.get("scaler") or {}, source)


def save_weights(output_dir: str, name: str, model: nn.Module, cfg: Any = None,
                 stage: int | None = None, epoch: int | None = None) -> str:
    """Model weights only, written atomically: a plain state dict with the published key names
    and shapes (the published ``load_param`` accepts it), and, when ``cfg`` is given, the
    metadata (config, dataset, sizes, stage, epoch, commit, and the SHA-256 of the weights file,
    which ties it to these weights) in a JSON file beside it."""
    path = os.path.join(output_dir, name)
    if is_main_process():
        net = unwrap(model)
        state = net.published_state_dict() if hasattr(net, "published_state_dict") else net.state_dict()
        meta = checkpoint_metadata(cfg, net, stage, epoch) if cfg is not None else None

        def write_meta(sha256: str) -> None:
            # once the weights are written and before they appear: a weights file never appears without
            # its metadata (and weights refused as non-finite get none)
            write_metadata(path, {**meta, WEIGHTS_HASH_KEY: sha256})
        save_atomic(state, path, check_finite=state, before_rename=write_meta if meta is not None else None)
        logger.info("Saved %s", path)
    return path


def resume_stage(stage: int, resume_state: dict[str, Any] | None, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> int:
    """The first epoch a stage runs: 1, or the one after ``resume_state`` (whose model, optimiser,
    scheduler and scaler are restored here). The RNG streams are not: see :func:`restore_train_state`."""
    if resume_state is None:
        return 1
    restore_train_state(resume_state, model, optimizer, scheduler, scaler)
    start_epoch = resume_state["epoch"] + 1
    logger.info("Stage %d: resuming at epoch %d", stage, start_epoch)
    return start_epoch


def is_due(epoch: int, period: int, max_epochs: int) -> bool:
    """Whether a periodic action (checkpoint, evaluation) runs after ``epoch``: every ``period``
    epochs and after the last."""
    return epoch % period == 0 or epoch == max_epochs


def save_epoch_weights(cfg: Any, model: nn.Module, stage: int, epoch: int) -> None:
    """The weights file of ``epoch`` when SOLVER.STAGE<stage>.CHECKPOINT_PERIOD says so (and after
    the last epoch): ``<MODEL.NAME>_stage1_<epoch>.pth`` in stage 1, ``<MODEL.NAME>_<epoch>.pth`` in
    stage 2, the published names."""
    solver = cfg.SOLVER.STAGE1 if stage == 1 else cfg.SOLVER.STAGE2
    if is_due(epoch, solver.CHECKPOINT_PERIOD, solver.MAX_EPOCHS):
        name = f"{cfg.MODEL.NAME}_stage1_{epoch}.pth" if stage == 1 else f"{cfg.MODEL.NAME}_{epoch}.pth"
        save_weights(cfg.OUTPUT_DIR, name, model, cfg, stage=stage, epoch=epoch)
