"""Multi-step learning-rate decay with warm-up (stage 2), stepped once per epoch."""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from config import WARMUP_METHODS

__all__ = ["WarmupMultiStepLR", "warmup_multistep_factor"]



def warmup_multistep_factor(
    epoch: int,
    milestones: Sequence[int],
    gamma: float,
    warmup_factor: float,
    warmup_iters: int,
    warmup_method: str,
) -> float:
    """Multiplier of the base lr at ``epoch``: warm-up factor x gamma**(milestones passed).

    During warm-up (epoch < warmup_iters) the warm-up factor is ``warmup_factor``
    ('constant') or ``warmup_factor * (1 - alpha) + alpha`` with alpha = epoch / warmup_iters
    ('linear'); afterwards it is 1.
    """
    factor = 1.0
    if epoch < warmup_iters:
        if warmup_method == "constant":
            factor = warmup_factor
        else:
            alpha = epoch / warmup_iters
            factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** bisect_right(milestones, epoch)


class WarmupMultiStepLR(LRScheduler):
    """lr = base_lr x warm-up factor x gamma ** bisect_right(milestones, last_epoch).

    ``state_dict`` / ``load_state_dict`` come from ``LRScheduler`` (every attribute but
    the optimizer), so a restored scheduler continues the schedule exactly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_factor: float = 1.0 / 3,
        warmup_iters: int = 500,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        milestones = list(milestones)
        if milestones != sorted(milestones):
            raise ValueError(f"WarmupMultiStepLR: milestones must be increasing integers, got {milestones}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(
                f"WarmupMultiStepLR: warmup_method {warmup_method!r} not in {WARMUP_METHODS}"
            )
        self.milestones = milestones
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        return warmup_multistep_factor(
            self.last_epoch, self.milestones, self.gamma,
            self.warmup_factor, self.warmup_iters, self.warmup_method,
        )

    def get_lr(self) -> list[float]:
        """Closed form: the lr depends only on ``last_epoch``, not on the previous lr."""
        factor = self._factor()
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
