"""Small run-time helpers: seeding, device choice, RNG state capture, JSON results."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from typing import Any, NoReturn

import numpy as np
import torch

from .errors import ConfigError, ReportedElsewhere
from .fileio import atomic_write

logger = logging.getLogger("svllreid")


CUBLAS_WORKSPACE = ":4096:8"   # the cuBLAS workspace setting that makes its kernels deterministic


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices), and set cuDNN as the published code does
    (``cudnn.deterministic`` and ``cudnn.benchmark`` both on).

    ``deterministic`` (SOLVER.DETERMINISTIC): also ``torch.use_deterministic_algorithms(True)``,
    cuBLAS's deterministic workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: call
    this before the first CUDA matrix product) and no cuDNN autotuning, so that the same run on
    the same GPU model and software repeats bit for bit. An op without a deterministic version
    then raises an error instead of running.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)


def nvidia_driver() -> str | None:
    """The installed NVIDIA driver's version (``/proc/driver/nvidia/version``; "installed" when only
    ``nvidia-smi`` shows it), or None when this machine has no NVIDIA driver."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(\S+)", f.readline())
        return m.group(1) if m else "installed"
    except OSError:
        return "installed" if shutil.which("nvidia-smi") else None


def cuda_problem() -> str | None:
    """Why this process cannot use CUDA, in words; None when it can.

    Tells apart a torch build without CUDA, a machine without an NVIDIA driver, GPUs hidden
    by CUDA_VISIBLE_DEVICES, and a driver that this torch build cannot use (typically one too
    old for the CUDA version the build was made for; torch's own warning is quoted when it
    gives one).
    """
    if torch.version.cuda is None:
        return f"this torch build, {torch.__version__}, has no CUDA support"
    with warnings.catch_warnings(record=True) as caught:   # torch says why once, as a warning
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return None
    driver = nvidia_driver()
    if driver is None:
        return "no NVIDIA driver was found, neither /proc/driver/nvidia/version nor nvidia-smi"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    said = next((" ".join(str(w.message).split()) for w in caught if "CUDA" in str(w.message)), "")
    return (f"the NVIDIA driver {driver} is installed but torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}, finds no usable GPU{': ' + said[:300] if said else ''}. A driver older than "
            "the build's CUDA gives this: install a torch build for this driver, see docs/usage.md")


def choose_device(name: str) -> tuple[torch.device, str]:
    """``MODEL.DEVICE`` as (torch.device, a line for the log saying which device and why).

    'cpu' is the CPU; 'cuda' / 'cuda:N' need a usable CUDA and are refused otherwise
    (ConfigError naming what was found: never a silent CPU run); 'auto' takes CUDA when it is
    usable and the CPU otherwise.
    """
    if name == "cpu":
        return torch.device("cpu"), "Device: the CPU (MODEL.DEVICE cpu)"
    problem = cuda_problem()
    if problem and name == "auto":
        return torch.device("cpu"), f"Device: the CPU, chosen by MODEL.DEVICE auto as CUDA is not usable: {problem}"
    if problem:
        raise ConfigError(f"MODEL.DEVICE = {name!r} but CUDA cannot be used: {problem}. Set MODEL.DEVICE cpu, "
                          "or auto to take CUDA where it is usable and the CPU elsewhere")
    device = torch.device("cuda" if name == "auto" else name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"MODEL.DEVICE = {name!r} but {count} GPU(s) are visible, numbered from 0 "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
    index = device.index or 0
    props = torch.cuda.get_device_properties(index)
    return device, (f"Device: cuda:{index}, {props.name} with {props.total_memory / 2 ** 30:.1f} GiB "
                    f"(MODEL.DEVICE {name}; torch {torch.__version__}, CUDA {torch.version.cuda})")


def resolve_device(name: str) -> torch.device:
    """``MODEL.DEVICE`` as a torch.device (:func:`choose_device`; CUDA asked for and not usable is an error)."""
    return choose_device(name)[0]


def select_gpus(device_id: str, cuda_wanted: bool = True) -> str | None:
    """Make only the GPUs listed in MODEL.DEVICE_ID ('0', '0,1') visible, as the published scripts do.

    Sets CUDA_VISIBLE_DEVICES before CUDA is first used; an explicit CUDA_VISIBLE_DEVICES in
    the environment wins (it was set on purpose, e.g. by a cluster scheduler). Devices are then
    numbered from 0 within the visible set: MODEL.DEVICE cuda:N picks the N-th of them.
    Under torchrun every local process needs a GPU of its own among the visible ones.
    Returns the value in force.
    """
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if "CUDA_VISIBLE_DEVICES" not in os.environ and cuda_wanted and local_procs > len(device_id.split(",")):
        raise ConfigError(f"MODEL.DEVICE_ID = {device_id!r} makes {len(device_id.split(','))} GPU(s) visible but "
                          f"{local_procs} processes run on this machine: list one GPU per process, e.g. "
                          f"MODEL.DEVICE_ID {','.join(map(str, range(local_procs)))!r}")
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        if os.environ["CUDA_VISIBLE_DEVICES"] != device_id:
            logger.info("CUDA_VISIBLE_DEVICES=%s from the environment (MODEL.DEVICE_ID %s not applied)",
                        os.environ["CUDA_VISIBLE_DEVICES"], device_id)
        return os.environ["CUDA_VISIBLE_DEVICES"]
    os.environ["CUDA_VISIBLE_DEVICES"] = device_id
    return device_id


AUTO_WORKERS = -1        # DATALOADER.NUM_WORKERS: choose from the cores present
MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:    # not on every OS
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def world_processes() -> int:
    """Processes of this run on all machines (torchrun's WORLD_SIZE; 1 without it)."""
    return max(1, int(os.environ.get("WORLD_SIZE") or 1))


def refuse_on_every_rank(message: str) -> NoReturn:
    """Every process of a job refuses with ``message``: rank 0 (torchrun's RANK; 0 without it) prints
    it, the others exit with the same code silently, so a job of N processes says it once."""
    raise (ConfigError if int(os.environ.get("RANK") or 0) == 0 else ReportedElsewhere)(message)


_capped_warned: set[tuple[int, int]] = set()


def resolve_num_workers(num_workers: int, procs_per_machine: int | None = None) -> int:
    """``DATALOADER.NUM_WORKERS`` as a count: -1 (auto) gives min(8, cores per local process - 1),
    leaving one core to the process that drives the device; a count >= 0 is kept, but at most the
    cores per local process (more workers than cores only compete for them: 1,000 workers made a
    tiny run take minutes), with one warning per process."""
    n = int(num_workers)
    procs = local_processes() if procs_per_machine is None else max(1, procs_per_machine)
    cores = max(1, available_cores() // procs)
    if n == AUTO_WORKERS:
        return max(0, min(MAX_AUTO_WORKERS, cores - 1))
    if n > cores:
        if (n, cores) not in _capped_warned:
            _capped_warned.add((n, cores))
            logger.warning("DATALOADER.NUM_WORKERS %d is more than the %d core(s) each of the %d process(es) of "
                           "this machine may use: %d loader workers instead", n, cores, procs, cores)
        return cores
    return n


def set_cpu_threads(num_workers: int, procs_per_machine: int = 1) -> int | None:
    """Give torch the cores that loader workers and sibling processes leave free (CPU runs).

    OpenMP threads that outnumber free cores spin at every barrier and make small models
    many times slower, so intra-op threads = cores / processes - workers (at least 1).
    ``num_workers`` -1 is resolved (:func:`resolve_num_workers`). An explicit OMP_NUM_THREADS
    wins. Returns the number set, or None.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    workers = resolve_num_workers(num_workers, procs_per_machine)
    n = max(1, (os.cpu_count() or 1) // max(1, procs_per_machine) - workers)
    torch.set_num_threads(n)
    return n


def rng_state() -> dict[str, Any]:
    """Every RNG state needed to resume a run bit-exactly (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON via a temporary file and rename: never a half-written file."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


class AverageMeter:
    """Running average of a scalar (weighted by the count of each update)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, val: float, n: int = 1) -> None:
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)
