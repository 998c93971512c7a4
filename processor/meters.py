"""Running averages of the loss components over an epoch, the stage's clock and its ETAs,
written to the log and the training record.

The values of each training step stay on the device until :meth:`EpochMeters.read`, which the
loops call once per log period and at the end of each epoch: one copy to the host for every
step since the last read, instead of one synchronisation per loss component and step.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from utils.misc import AverageMeter
from utils.record import TrainingRecord

from .position import POSITION, check_finite_loss

__all__ = ["EpochMeters", "hms"]


def hms(seconds: float) -> str:
    """``seconds`` as ``h:mm:ss``."""
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class EpochMeters:
    """One stage's running averages of the loss components over an epoch, with the epoch's clock,
    sample count and the stage's time per iteration; writes them to the training record.

    :meth:`update` keeps each step's values on the device; :meth:`read` brings every pending
    step to the host at once, stops the run at the first step with a non-finite loss
    (:func:`~processor.position.check_finite_loss`) and adds the steps to float64 host averages,
    the same numbers as reading every step. ``later_seconds`` / ``untimed``: what the run does
    after this stage, for the run's ETA (set by the loop).
    """

    UNCHECKED = ("acc",)     # values that are not losses: no finiteness check

    def __init__(self, stage: int, names: Sequence[str], record: TrainingRecord,
                 device: torch.device | None = None) -> None:
        self.stage, self.record, self.device = stage, record, device
        self.meters = {k: AverageMeter() for k in names}
        self.pending: list[tuple[tuple[str, ...], torch.Tensor, int, int]] = []
        self.epoch, self.iteration, self.samples, self.t0 = 0, 0, 0, time.time()
        self.total_iterations = 0                    # of this stage in this process (:meth:`plan`)
        self.stage_seconds, self.stage_iterations = 0.0, 0   # finished epochs
        self.later_seconds, self.untimed = 0.0, ""

    def plan(self, iterations_per_epoch: int, first_epoch: int, last_epoch: int) -> None:
        """The stage runs epochs ``first_epoch..last_epoch`` of ``iterations_per_epoch`` each."""
        self.total_iterations = iterations_per_epoch * max(0, last_epoch - first_epoch + 1)

    def start(self, epoch: int) -> None:
        """Reset for ``epoch`` and mark it as where the run is (for the Ctrl-C message)."""
        for m in self.meters.values():
            m.reset()
        self.pending.clear()
        self.epoch, self.iteration, self.samples, self.t0 = epoch, 0, 0, time.time()
        POSITION.stage, POSITION.epoch = self.stage, epoch

    def update(self, values: dict[str, torch.Tensor], n: int) -> None:
        """Add one step of ``n`` samples: ``values`` are 0-dim tensors, kept on the device until
        :meth:`read` (no synchronisation here); values without a meter are ignored then."""
        self.iteration += 1
        self.samples += n
        vector = torch.stack([v.detach().float() for v in values.values()])
        self.pending.append((tuple(values), vector, n, self.iteration))

    def read(self) -> None:
        """Bring the pending steps to the host (one copy), check each for a non-finite loss in
        step order, and add them to the averages."""
        if not self.pending:
            return
        flat = torch.cat([v for _, v, _, _ in self.pending]).tolist()
        pos = 0
        for names, _, n, iteration in self.pending:
            values = dict(zip(names, flat[pos:pos + len(names)]))
            pos += len(names)
            check_finite_loss({k: v for k, v in values.items() if k not in self.UNCHECKED},
                              self.stage, self.epoch, iteration)
            for k, v in values.items():
                if k in self.meters:
                    self.meters[k].update(v, n)
        self.pending.clear()

    def __getitem__(self, name: str) -> float:
        return self.meters[name].avg

    def averages(self) -> dict[str, float]:
        return {k: m.avg for k, m in self.meters.items()}

    def seconds(self) -> float:
        """Time since :meth:`start`."""
        return time.time() - self.t0

    def end_epoch(self) -> float:
        """Read the pending steps and add the epoch to the stage's clock; returns its seconds."""
        self.read()
        dt = self.seconds()
        self.stage_seconds += dt
        self.stage_iterations += self.iteration
        self.iteration = 0
        return dt

    def timing(self) -> str:
        """Seconds per iteration over the stage so far, the ETA of the stage and of the run, and on
        CUDA the peak memory, e.g. ``0.412 s/iter, eta 1:20:30 stage, 1:24:10 run, peak 12.3 GiB``."""
        done = self.stage_iterations + self.iteration
        per = (self.stage_seconds + self.seconds()) / max(done, 1)
        left = per * max(self.total_iterations - done, 0)
        text = f"{per:.3f} s/iter, eta {hms(left)} stage, {hms(left + self.later_seconds)} run"
        if self.untimed:
            text += f" plus {self.untimed}, not timed yet"
        if self.device is not None and self.device.type == "cuda":
            text += f", peak {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.1f} GiB"
        return text

    def record_period(self, iteration: int, step: int, lr: float) -> None:
        """The running averages at ``iteration`` (``step`` counted over the whole stage)."""
        self.record.log(self.stage, self.epoch, iteration, step=step, lr=lr, **self.averages())

    def record_epoch(self, lr: float, seconds: float, **extra: float) -> None:
        """The epoch's averages, its duration and ``extra`` values."""
        self.record.log(self.stage, self.epoch, kind="epoch", lr=lr, seconds=seconds, **extra, **self.averages())
