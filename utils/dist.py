"""Small ``torch.distributed`` helpers that degrade to single-process no-ops.

Every helper works whether or not a process group exists, so training and loss code
can call them unconditionally (CPU, one GPU, or DDP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_dist", "get_rank", "get_world_size", "is_main_process", "gather_with_grad", "init_distributed",
           "shard_indices", "gather_strided", "all_gather_object", "broadcast_object", "average_gradients", "barrier",
           "cleanup"]


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


def init_distributed(device_name: str, timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group started by ``torchrun`` and return this process's device.

    Backend NCCL on CUDA, gloo on the CPU; one process per device (LOCAL_RANK picks the
    GPU). ``device_name`` is the device already chosen (``utils.misc.choose_device``: 'cuda' or
    'cpu'), so a CUDA that cannot be used has been refused before the group is joined. The
    timeout bounds every collective, so a rank that dies makes the others fail with an error
    instead of waiting forever.
    """
    import datetime
    import os

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("MODEL.DIST_TRAIN True needs a torchrun launch, e.g. "
                           "`torchrun --nproc_per_node 2 train_svllreid.py --config_file F MODEL.DIST_TRAIN True`")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_name.startswith("cuda") and torch.cuda.is_available()
    if use_cuda and local_rank >= torch.cuda.device_count():
        from .errors import ConfigError
        raise ConfigError(f"process {local_rank} of this machine needs a GPU of its own but "
                          f"{torch.cuda.device_count()} are visible: list one per process in MODEL.DEVICE_ID, "
                          "e.g. MODEL.DEVICE_ID 0,1")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not is_dist():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if use_cuda else None)
    return device


def shard_indices(n: int) -> range:
    """This rank's strided share ``rank, rank + W, ...`` of ``range(n)``."""
    return range(get_rank(), n, get_world_size())


def gather_strided(local: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble rows computed for :func:`shard_indices` on every rank into ``n`` rows in order.

    Every rank receives the full tensor (no gradients). Without a process group the
    tensor is returned unchanged.
    """
    world = get_world_size()
    if world == 1:
        return local
    size = (n + world - 1) // world
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = local.new_empty((n, *local.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n, world))]
    return out


def all_gather_object(obj: object) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when single-process)."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (pickled; for small results only)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of a module that is not wrapped in DDP (e.g. the center loss)."""
    world = get_world_size()
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (end of a torchrun job)."""
    if is_dist():
        dist.destroy_process_group()
