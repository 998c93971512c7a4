"""Pieces shared by the stage-1/stage-2 loops: AMP context, training-state checkpoints, batches."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from config import ConfigError
from datasets.sampler import epoch_seed
from model.loading import checkpoint_metadata
from utils.checkpoint import (load_file, load_model_weights, model_state, non_finite_keys, save_atomic, unwrap,
                              write_metadata)
from utils.dist import all_gather_object, gather_strided, get_rank, get_world_size, is_main_process, shard_indices
from utils.fileio import ctrl_c_deferred
from utils.misc import AverageMeter, rng_state, set_rng_state
from utils.record import TrainingRecord
from config.resume import check_train_state
from utils.run_dir import LAST_CHECKPOINT, RunError

logger = logging.getLogger("svllreid")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; a no-op context on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_scaler(device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch dict to ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclasses.dataclass
class RunPosition:
    """Where the running training is, and what ``last.pth`` holds (for the Ctrl-C message)."""
    stage: int | None = None
    epoch: int | None = None
    saved: tuple[int, int] | None = None

    def describe(self) -> str:
        where = f"stopped in stage {self.stage}, epoch {self.epoch}" if self.stage else "stopped before training"
        if self.saved is None:
            return f"{where}; no training state was saved yet"
        return f"{where}; {LAST_CHECKPOINT} holds the end of stage {self.saved[0]} epoch {self.saved[1]}"


POSITION = RunPosition()


class NonFiniteLossError(RunError):
    """A training loss became NaN or Inf: the run stops before the step is applied."""


def check_finite_loss(values: dict[str, float], stage: int, epoch: int, iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the step and every loss component when one is not finite.

    Called after the forward pass and before backward/step, so no non-finite update is
    ever applied and ``last.pth`` keeps the state of the end of the previous epoch.
    """
    if all(math.isfinite(v) for v in values.values()):
        return
    parts = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    lr_key = f"SOLVER.STAGE{stage}.BASE_LR"
    kept = (f"{LAST_CHECKPOINT} keeps the last finite state (end of stage {POSITION.saved[0]} epoch "
            f"{POSITION.saved[1]})" if POSITION.saved else "no training state had been saved yet")
    # --resume keeps the run's settings (a changed BASE_LR is refused), so the advice is a new start
    raise NonFiniteLossError(f"stage {stage}, epoch {epoch}, iteration {iteration}: non-finite loss ({parts}); "
                             f"stopped before this step was applied, {kept}. The training diverged: start it over "
                             f"with a lower {lr_key} and --overwrite (this run's files move to previous-<time>/)")


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
             "config": config, "extra": extra or {}}
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


def restore_train_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, scaler: torch.amp.GradScaler) -> None:
    """Put model, optimiser, scheduler and scaler back to a saved state.

    The RNG states are restored separately, with :func:`restore_rng`,
    right before the first resumed epoch: work done in between (feature caching,
    loader start-up) draws random numbers too.
    """
    load_model_weights(model, state["model"], state.get("source", LAST_CHECKPOINT))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])


def save_weights(output_dir: str, name: str, model: nn.Module, cfg: Any = None,
                 stage: int | None = None, epoch: int | None = None) -> str:
    """Model weights only, written atomically: a plain state dict with the published key names
    and shapes (the published ``load_param`` accepts it), and, when ``cfg`` is given, the
    metadata (config, dataset, sizes, stage, epoch, commit) in a JSON file beside it."""
    path = os.path.join(output_dir, name)
    if is_main_process():
        net = unwrap(model)
        state = net.published_state_dict() if hasattr(net, "published_state_dict") else net.state_dict()
        # metadata first, so that a weights file never appears without it (none for weights refused as non-finite)
        if cfg is not None and not non_finite_keys(state):
            write_metadata(path, checkpoint_metadata(cfg, net, stage, epoch))
        save_atomic(state, path, check_finite=state)
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


def optimizer_step(scaler: torch.amp.GradScaler, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   after_step: Callable[[], None] | None = None) -> None:
    """Backward of the (scaled) ``loss``, step of ``optimizer``, then ``after_step()`` (stage 2's
    center step, which needs the same scaler), then the scaler update. Check the loss first:
    :func:`check_finite_loss`."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    if after_step is not None:
        after_step()
    scaler.update()


class EpochMeters:
    """One stage's running averages of the loss components over an epoch, with the epoch's clock
    and sample count; writes them to the training record."""

    def __init__(self, stage: int, names: Sequence[str], record: TrainingRecord) -> None:
        self.stage, self.record = stage, record
        self.meters = {k: AverageMeter() for k in names}
        self.epoch, self.samples, self.t0 = 0, 0, time.time()

    def start(self, epoch: int) -> None:
        """Reset for ``epoch`` and mark it as where the run is (for the Ctrl-C message)."""
        for m in self.meters.values():
            m.reset()
        self.epoch, self.samples, self.t0 = epoch, 0, time.time()
        POSITION.stage, POSITION.epoch = self.stage, epoch

    def update(self, values: dict[str, float], n: int) -> None:
        """Add one batch of ``n`` samples; values without a meter are ignored."""
        self.samples += n
        for k, v in values.items():
            if k in self.meters:
                self.meters[k].update(v, n)

    def __getitem__(self, name: str) -> float:
        return self.meters[name].avg

    def averages(self) -> dict[str, float]:
        return {k: m.avg for k, m in self.meters.items()}

    def seconds(self) -> float:
        """Time since :meth:`start`."""
        return time.time() - self.t0

    def record_period(self, iteration: int, step: int, lr: float) -> None:
        """The running averages at ``iteration`` (``step`` counted over the whole stage)."""
        self.record.log(self.stage, self.epoch, iteration, step=step, lr=lr, **self.averages())

    def record_epoch(self, lr: float, seconds: float, **extra: float) -> None:
        """The epoch's averages, its duration and ``extra`` values."""
        self.record.log(self.stage, self.epoch, kind="epoch", lr=lr, seconds=seconds, **extra, **self.averages())


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


PROGRESS_ENV = "SVLLREID_PROGRESS"
PROGRESS_CHOICES = ("auto", "on", "off")


def progress_enabled() -> bool:
    """Whether progress bars are drawn: ``SVLLREID_PROGRESS`` = auto (default) / on / off.

    ``auto`` draws them only when stderr is a terminal, so redirected output stays one log
    line per period; ``SVLLREID_NO_TQDM=1`` (the older switch) means ``off``. Only the
    main process draws.
    """
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in PROGRESS_CHOICES:
        raise ConfigError(f"{PROGRESS_ENV} = {mode!r} is not allowed; choose one of: "
                         f"{', '.join(map(repr, PROGRESS_CHOICES))}")
    if os.environ.get("SVLLREID_NO_TQDM") == "1" or mode == "off" or not is_main_process():
        return False
    return mode == "on" or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def progress(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    """A tqdm bar over ``iterable`` (a silent pass-through when :func:`progress_enabled` is false)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not progress_enabled())


def sharded_loader(loader: DataLoader) -> DataLoader:
    """The same loader over this rank's strided share of the dataset (itself when single-process)."""
    if get_world_size() == 1:
        return loader
    return DataLoader(Subset(loader.dataset, shard_indices(len(loader.dataset))), batch_size=loader.batch_size,
                      shuffle=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory)


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch`` of ``loader`` a function of (seed, epoch, rank) alone.

    The sampler draws its order from (seed, epoch); the loader's generator, which seeds
    the workers' augmentation RNGs, is re-seeded too. With that, resuming at any epoch
    reproduces the same batches and augmentations as an uninterrupted run.
    """
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch) + get_rank())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped model in eval mode (no DDP collectives), its previous mode restored after."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def encode_loader(model: nn.Module, loader: DataLoader, device: torch.device,
                  encode: Callable[[nn.Module, dict[str, Any]], torch.Tensor], desc: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, pids, camids) of every sample of ``loader``, in dataset order, eval mode, no grad.

    ``encode(net, batch)`` gives a batch's features. Under DDP each rank encodes a strided
    shard and every rank receives the whole set.
    """
    feats, pids, camids = [], [], []
    with eval_mode(model) as net:
        for batch in progress(sharded_loader(loader), None, desc):
            batch = to_device(batch, device)
            with autocast(device):
                feats.append(encode(net, batch).float())
            pids.append(batch["pid"])
            camids.append(batch["camid"])
    n = len(loader.dataset)
    return tuple(gather_strided(torch.cat(x), n) for x in (feats, pids, camids))
