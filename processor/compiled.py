"""``SOLVER.COMPILE``: the model compiled with ``torch.compile`` for training and evaluation.

The model is compiled in place (``nn.Module.compile``): its ``forward`` runs through
TorchDynamo + inductor, while its parameters, buffers and ``state_dict`` keys stay those of
the eager model. So every checkpoint, ``last.pth``, the metadata, the ONNX export and
``utils.checkpoint.unwrap`` see the plain model (no ``_orig_mod.`` prefix anywhere) and a
compiled run's files load into eager code, ours or the published one.

Under DDP the model is compiled first and wrapped after (``DDP(compiled)``): the one compiled
module serves the training forward through DDP, and evaluation and the stage-1 feature cache,
which run on the unwrapped model. DDP is rebuilt for each stage; the compiled module is not.
The cost: DDP cannot overlap its gradient all-reduce with the backward pass (that needs
Dynamo to trace DDP itself); for ViT-B-16 that is one all-reduce of about 0.35 GB of fp32
gradients per step, a few milliseconds over NVLink against a step of about 75 ms.

Graphs are static (``dynamic=False``): every shape is compiled for, so the stage-2 step is
the same graph whatever ran before it (a resumed run computes what an uninterrupted one does),
and nothing pays for symbolic sizes. What compiles when (each once per run; later calls reuse
the graph):
- every ``mode`` of ``SVLLReID.forward`` (``'image_proj'``, ``'stage1'``, ``'text'``,
  ``'stage2'``, evaluation) and every change of train/eval or grad mode is its own graph
  (Dynamo guards on the ``mode`` string: a recompile, not a graph break);
- a batch of another size is another graph: the last, partial stage-1 batch of an epoch
  compiles once more; evaluation, the stage-1 feature cache and the stage-2 text features
  pad their last partial batch to the full size instead (:func:`fixed_batch_encode`), which
  gives the same features per row;
- stage 1's language SSL takes the unique labels of each batch (``torch.unique``, see
  ``model.make_model.unique_labels``): a graph break, and the prompt graph after it has a
  dynamic size, compiled once for every number of identities.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn as nn

from utils.checkpoint import unwrap
from utils.errors import UserError

__all__ = ["check_compile_support", "compile_model", "is_compiled", "log_first_step", "fixed_batch_encode",
           "pad_rows"]

logger = logging.getLogger("svllreid")
T = TypeVar("T")

_logged: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def check_compile_support(device: torch.device) -> None:
    """Refuse in one line a machine where ``torch.compile`` cannot work, before any training.

    Inductor builds C++ kernels on the CPU (a C++ compiler) and Triton kernels on CUDA.
    """
    key = "SOLVER.COMPILE True"
    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"{key}: torch.compile does not support this Python/platform; set SOLVER.COMPILE False")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserError(f"{key} on CUDA needs Triton (pip install triton, usually installed with torch); "
                            "set SOLVER.COMPILE False to train without it") from None
    elif device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            raise UserError(f"{key} on the CPU needs a C++ compiler ({' / '.join(names)} not found): install one "
                            "(e.g. apt install g++) or set SOLVER.COMPILE False")


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Compile ``model`` in place (``nn.Module.compile``) and return it; logs that compile is on.

    Call before wrapping the model in DistributedDataParallel (see the module docstring).
    """
    check_compile_support(device)
    model.compile(dynamic=False)
    logger.info("SOLVER.COMPILE: the model is compiled with torch.compile (inductor, in place: checkpoint keys "
                "unchanged). Each kind of step compiles when first used (minutes for ViT-B-16 on a GPU); "
                "the time of each first compiled step is logged")
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a DDP wrapper holds) was compiled with ``nn.Module.compile``."""
    return getattr(unwrap(model), "_compiled_call_impl", None) is not None


def _first_time(model: nn.Module, what: str) -> bool:
    """True once per (model, what), and only for a compiled model."""
    if not is_compiled(model):
        return False
    seen = _logged.setdefault(unwrap(model), set())
    if what in seen:
        return False
    seen.add(what)
    return True


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _log_time(what: str, seconds: float) -> None:
    logger.info("SOLVER.COMPILE: the first compiled %s took %.1f s (compilation included)", what, seconds)


def log_first_step(items: Iterable[T], model: nn.Module, what: str, device: torch.device) -> Iterator[T]:
    """Yield ``items``; for a compiled model, log how long the loop body of the first item took
    (the compilation of that step), once per model and ``what``."""
    if not _first_time(model, what):
        yield from items
        return
    it = iter(items)
    for item in it:
        start = time.perf_counter()
        yield item
        _sync(device)
        _log_time(what, time.perf_counter() - start)
        break
    yield from it


def pad_rows(batch: dict[str, Any], size: int) -> tuple[dict[str, Any], int]:
    """``(padded batch, n)``: the tensors of ``batch`` whose first dimension is the batch size ``n``
    extended to ``size`` rows by repeating the last row (other values as they are)."""
    n = len(next(v for v in batch.values() if torch.is_tensor(v) and v.dim() > 0))
    if n >= size:
        return batch, n

    def pad(v: Any) -> Any:
        if not (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n):
            return v
        return torch.cat([v, v[-1:].expand(size - n, *v.shape[1:])])
    return {k: pad(v) for k, v in batch.items()}, n


def fixed_batch_encode(encode: Callable[[nn.Module, dict[str, Any]], torch.Tensor], model: nn.Module,
                       batch_size: int, what: str) -> Callable[[nn.Module, dict[str, Any]], torch.Tensor]:
    """``encode`` for a compiled ``model`` in eval mode: a partial batch is padded to ``batch_size``
    rows and the result cut back, so the last batch reuses the full-size graph instead of
    compiling another; the first call's time is logged (``what``). Each row's output does not
    depend on the others in eval mode (BatchNorm uses its running statistics), so the rows
    returned equal an unpadded call's. ``encode`` itself when the model is not compiled."""
    if not is_compiled(model):
        return encode
    timing = _first_time(model, what)

    def run(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        nonlocal timing
        start = time.perf_counter()
        padded, n = pad_rows(batch, batch_size)
        out = encode(net, padded)[:n]
        if timing:
            timing = False
            _sync(out.device)
            _log_time(what, time.perf_counter() - start)
        return out
    return run
