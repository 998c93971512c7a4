"""Checkpoints: atomic writes, safe loads, and load errors that list what does not fit."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import torch
import torch.nn as nn


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys)."""


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_file(path: str, weights_only: bool = True) -> Any:
    """torch.load on the CPU with a clear error for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return unwrap(model).state_dict()


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing missing / unexpected / mis-shaped keys (if any)."""
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shaped = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shaped:
        def show(name: str, items: list[str]) -> str:
            head = ", ".join(items[:8]) + (f", ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            return f"{name} ({len(items)}): {head}" if items else ""
        parts = [p for p in (show("missing keys", missing), show("unexpected keys", unexpected),
                             show("mis-shaped keys", shaped)) if p]
        raise CheckpointMismatchError(f"{source} does not fit the model — " + "; ".join(parts))


def load_model_weights(model: nn.Module, path_or_state: str | Mapping[str, torch.Tensor]) -> None:
    """Load model weights (a checkpoint path, a full training state, or a state dict) strictly."""
    source = path_or_state if isinstance(path_or_state, str) else "state dict"
    sd = load_file(path_or_state) if isinstance(path_or_state, str) else path_or_state
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]          # a last.pth training state
    sd = _strip_prefix(sd)
    check_state_dict(model, sd, source)
    unwrap(model).load_state_dict(sd, strict=True)
