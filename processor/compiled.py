"""``SOLVER.COMPILE``: the model compiled with ``torch.compile`` for training and evaluation.

The model is compiled in place (``nn.Module.compile``): its ``forward`` runs through
TorchDynamo + inductor, while its parameters, buffers and ``state_dict`` keys stay those of
the eager model. So every checkpoint, ``last.pth``, the metadata, the ONNX export and
``utils.checkpoint.unwrap`` see the plain model (no ``_orig_mod.`` prefix anywhere) and a
compiled run's files load into eager code, ours or the published one.

Under DDP the model is compiled first and wrapped after (``DDP(compiled)``): the one compiled
module serves the training forward through DDP, and evaluation and the stage-1 feature cache,
which run on the unwrapped model. DDP is rebuilt for each stage; the compiled module is not.
The gradient all-reduce still overlaps the backward pass: DDP's forward marks itself active
while it calls the compiled module, and Dynamo then compiles through its DDPOptimizer
(``torch._dynamo.config.optimize_ddp``), which splits the graph at DDP's bucket boundaries so
that each bucket's all-reduce starts when its part of the backward is done. The price is more,
smaller graphs (a longer first step), not lost overlap.

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
- stage 1's language SSL takes the unique labels of each batch, computed on the host by the
  training loop (``model.make_model.unique_labels`` when it is not given): the prompt graph has
  a dynamic size, compiled once for every number of identities.

Random numbers: inductor would draw them with its own random-number code, not torch's eager
ops, so stage 1's random prompt masks, and with them every later step, would differ from
the eager run's. The model is compiled with ``fallback_random``: the graph calls the eager
random ops, in the eager order, so a compiled run draws what an eager run draws and follows it
up to float rounding. Its cost is small: measured in docs/usage.md (Compiled training).

Dynamo allows :data:`RECOMPILE_LIMIT` compilations per function (its default of 8 is about
what ``SVLLReID.forward`` legitimately meets in one run). Past the limit Dynamo would run the
function eagerly without a word; here that is an error instead (one line, exit 2), and the
number of compilations and graph breaks so far is logged with the time of every first
compiled step (:func:`compile_counts`).
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
from utils.device_info import c_compiler, c_compilers, python_header
from utils.errors import UserError

__all__ = ["RECOMPILE_LIMIT", "check_compile_support", "compile_model", "compile_counts", "is_compiled",
           "log_first_step", "fixed_batch_encode", "pad_rows"]

logger = logging.getLogger("svllreid")
T = TypeVar("T")
RECOMPILE_LIMIT = 32     # compilations per function before Dynamo gives up on it (an error here, never eager)

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
        # Triton builds each kernel's launcher as a Python C extension: a C compiler and Python.h
        if c_compiler() is None:
            raise UserError(f"{key} on CUDA needs a C compiler for Triton's kernel launchers "
                            f"({' / '.join(c_compilers())} not found): install one (e.g. apt install gcc) or set "
                            "SOLVER.COMPILE False")
        header = python_header()
        if not os.path.isfile(header):
            raise UserError(f"{key} on CUDA needs the Python headers for Triton's kernel launchers ({header} not "
                            "found): install them (e.g. apt install python3-dev) or set SOLVER.COMPILE False")
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
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # random ops (stage 1's prompt masks) drawn by the eager ops from torch's generator, not by inductor's
    # own: the compiled run then draws what the eager run draws (docstring above: Random numbers)
    model.compile(dynamic=False, options={"fallback_random": True})
    model._compiled_call_impl = _refuse_eager_fallback(model._compiled_call_impl)
    logger.info("SOLVER.COMPILE: the model is compiled with torch.compile (inductor, in place: checkpoint keys "
                "unchanged). Each kind of step compiles when first used (minutes for ViT-B-16 on a GPU); "
                "the time of each first compiled step is logged")
    return model


def _refuse_eager_fallback(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` with Dynamo's recompile-limit failure turned into a one-line error."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except FailOnRecompileLimitHit:
            frames, breaks = compile_counts()
            limit = torch._dynamo.config.recompile_limit      # RECOMPILE_LIMIT, or more if set higher before
            raise UserError(f"SOLVER.COMPILE: a function of the model needed more than {limit} compilations "
                            f"({frames} in all, {breaks} graph breaks), and would have fallen back to eager code; "
                            "set SOLVER.COMPILE False, and see TORCH_LOGS=recompiles for what changes") from None
    return run


def compile_counts() -> tuple[int, int]:
    """(frames compiled, graph breaks) in this process so far: every first compilation and every
    recompilation counts one frame (Dynamo's own counters)."""
    from torch._dynamo.utils import counters
    return int(counters["frames"]["ok"]), int(sum(counters["graph_break"].values()))


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
    frames, breaks = compile_counts()
    logger.info("SOLVER.COMPILE: the first compiled %s took %.1f s, compilation included; so far %d compiled "
                "frame(s), %d graph break(s)", what, seconds, frames, breaks)


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
