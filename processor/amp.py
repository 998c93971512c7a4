"""Mixed precision: the autocast context and the gradient scaler of a training step (CUDA only)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

__all__ = ["autocast", "make_scaler", "optimizer_step"]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; a no-op context on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_scaler(device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda")


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
