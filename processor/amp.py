"""Mixed precision: the autocast context and the gradient scaler of a training step (CUDA only)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["autocast", "make_scaler", "load_scaler_state", "optimizer_step"]

logger = logging.getLogger("svllreid")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; a no-op context on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_scaler(device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda")


def load_scaler_state(scaler: torch.amp.GradScaler, state: Mapping[str, Any], source: str = "last.pth") -> None:
    """Restore ``scaler`` from a saved state, also when the run changes device on resume
    (MODEL.DEVICE may): a state saved by a disabled scaler (a CPU run) is empty, and an enabled
    (CUDA) scaler then starts fresh, as a new run's does; a state saved by an enabled scaler means
    nothing to a disabled one (a CUDA run resumed on the CPU). Each case is one log line."""
    if scaler.is_enabled() and not state:
        logger.info("%s holds no gradient-scaler state (written without mixed precision, e.g. on the CPU): "
                    "the scaler of this device starts fresh", source)
        return
    if not scaler.is_enabled() and state:
        logger.info("%s holds a gradient-scaler state (written with mixed precision, on CUDA); this device "
                    "trains without mixed precision, so it is not used", source)
        return
    scaler.load_state_dict(dict(state))


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
