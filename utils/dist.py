"""Small ``torch.distributed`` helpers that degrade to single-process no-ops.

Every helper works whether or not a process group exists, so training and loss code
can call them unconditionally (CPU, one GPU, or DDP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_dist", "get_rank", "get_world_size", "is_main_process", "gather_with_grad"]


def is_dist() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that logs and writes checkpoints."""
    return get_rank() == 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping the autograd graph.

    Rows of rank ``r`` occupy ``[r * n, (r + 1) * n)``. In the backward pass the
    gradients every rank computes for a slice are summed into the owning rank's
    input, so a loss that uses other ranks' rows (e.g. as negatives) trains them too.
    All ranks must pass tensors of the same shape. Without a process group (or with
    a single process) the tensor is returned unchanged.
    """
    if get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather  # differentiable all_gather

    return torch.cat(all_gather(tensor), dim=0)
