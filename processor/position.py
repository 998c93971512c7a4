"""Where the running training is (for the Ctrl-C message), and the stop on a non-finite loss."""
from __future__ import annotations

import dataclasses
import math

from utils.run_dir import LAST_CHECKPOINT, RunError

__all__ = ["RunPosition", "POSITION", "NonFiniteLossError", "check_finite_loss"]


@dataclasses.dataclass
class RunPosition:
    """Where the running training is, and what ``last.pth`` holds (for the Ctrl-C message)."""
    stage: int | None = None
    epoch: int | None = None
    saved: tuple[int, int] | None = None

    def reset(self) -> None:
        """Forget the position of an earlier run in this process (each training run starts with it)."""
        self.stage = self.epoch = None
        self.saved = None

    def describe(self) -> str:
        where = f"stopped in stage {self.stage}, epoch {self.epoch}" if self.stage else "stopped before training"
        if self.saved is None:
            return f"{where}; no training state was saved yet"
        return f"{where}; {LAST_CHECKPOINT} holds the end of stage {self.saved[0]} epoch {self.saved[1]}"


POSITION = RunPosition()


class NonFiniteLossError(RunError):
    """A training loss became NaN or Inf: the run stops at its next log line, before saving anything."""


def check_finite_loss(values: dict[str, float], stage: int, epoch: int, iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the step and every loss component when one is not finite.

    The training loops check the steps of each log period when they read them (once per log
    period and at the end of each epoch, :class:`processor.meters.EpochMeters`): the weights in
    memory may hold the bad steps by then, but nothing is saved after them, so ``last.pth``
    keeps the state of the end of the previous epoch.
    """
    if all(math.isfinite(v) for v in values.values()):
        return
    parts = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    lr_key = f"SOLVER.STAGE{stage}.BASE_LR"
    kept = (f"{LAST_CHECKPOINT} keeps the last finite state (end of stage {POSITION.saved[0]} epoch "
            f"{POSITION.saved[1]})" if POSITION.saved else "no training state had been saved yet")
    # --resume keeps the run's settings (a changed BASE_LR is refused), so the advice is a new start
    raise NonFiniteLossError(f"stage {stage}, epoch {epoch}, iteration {iteration}: non-finite loss ({parts}); "
                             f"stopped at the next log line without saving anything, {kept}. The training diverged: "
                             "start it over "
                             f"with a lower {lr_key} and --overwrite (this run's files move to previous-<time>/)")
