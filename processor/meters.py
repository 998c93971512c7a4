"""Running averages of the loss components over an epoch, written to the training record."""
from __future__ import annotations

import time
from collections.abc import Sequence

from utils.misc import AverageMeter
from utils.record import TrainingRecord

from .position import POSITION

__all__ = ["EpochMeters"]


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
