"""Set-up shared by the command-line tools: config, logging, device, the loaded model."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch  # noqa: E402

from config import ConfigError, get_key, load_config  # noqa: E402
from retrieval.features import camera_row, load_model  # noqa: E402
from utils.checkpoint import read_metadata  # noqa: E402
from utils.dist import init_distributed  # noqa: E402
from utils.logger import setup_logger  # noqa: E402
from utils.misc import local_processes, resolve_device, select_gpus, set_cpu_threads, world_processes  # noqa: E402

# The model's input, which the checkpoint's metadata records: the tools take it from there.
INPUT_KEYS = ("INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST", "INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD")


def checkpoint_input_opts(weight: str, opts: Sequence[str]) -> list[str]:
    """``KEY VALUE`` overrides of :data:`INPUT_KEYS` from the metadata beside ``weight`` (the
    training run's input size and normalisation), for the keys ``opts`` does not set: a value
    given on the command line wins, the config file's value gives way to the checkpoint's."""
    meta = read_metadata(weight) if weight and os.path.isfile(weight) else None
    saved = (meta or {}).get("config") or {}
    given = set(list(opts)[0::2])
    out: list[str] = []
    for key in INPUT_KEYS:
        section, leaf = key.split(".")
        value = (saved.get(section) or {}).get(leaf)
        if value is not None and key not in given:
            out += [key, str(list(value))]
    return out


def load_tool_config(config_file: str, opts: Sequence[str]) -> Any:
    """The frozen config of a tool: the config file, then the checkpoint's input settings
    (:func:`checkpoint_input_opts`; logged when they change something), then ``opts``."""
    cfg = load_config(config_file, list(opts))
    from_ckpt = checkpoint_input_opts(cfg.TEST.WEIGHT, opts)
    changed = [f"{k} {v}" for k, v in zip(from_ckpt[0::2], from_ckpt[1::2]) if str(list(get_key(cfg, k))) != v]
    if changed:
        cfg = load_config(config_file, from_ckpt + list(opts))
        logging.getLogger("svllreid").info("From the checkpoint's metadata (the training input): %s",
                                           ", ".join(changed))
    return cfg


def setup(config_file: str, opts: Sequence[str], dist_timeout_minutes: float | None = None) -> tuple[Any, torch.device]:
    """(frozen config, device) with console logging; TEST.WEIGHT is required. The input size and
    normalisation default to the checkpoint's (:func:`load_tool_config`).

    With ``dist_timeout_minutes`` the tool may run under ``torchrun``: GPUs are chosen as for
    training (MODEL.DEVICE_ID, one per local process), the process group is joined when there
    are several processes (collectives wait up to that long), and CPU threads are shared
    between the processes of a machine.
    """
    setup_logger("svllreid", None, if_train=False)
    cfg = load_tool_config(config_file, opts)
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: add TEST.WEIGHT path/to/checkpoint.pth after the options")
    procs = 1
    if dist_timeout_minutes is not None:
        procs = local_processes()
        select_gpus(cfg.MODEL.DEVICE_ID, cuda_wanted=cfg.MODEL.DEVICE.startswith("cuda"))
    device = resolve_device(cfg.MODEL.DEVICE)   # CUDA asked for and not usable: refused before any group
    if dist_timeout_minutes is not None and world_processes() > 1:
        device = init_distributed(device.type, dist_timeout_minutes)
    if device.type == "cpu":
        set_cpu_threads(cfg.DATALOADER.NUM_WORKERS, procs)
    return cfg, device


def camera_id(camera: int | None, info: dict[str, Any] | None = None) -> int | None:
    """``--camera N`` (the number written in names, c1 = 1) -> camera id (SIE row), numbered as the
    checkpoint's training set numbers its cameras (``info['camera_numbers']``); a camera the
    model never saw is refused. Without ``info`` (model not loaded yet) only the form is checked."""
    if camera is None:
        return None
    numbers = (info or {}).get("camera_numbers") or {}
    if camera < 0 or (camera == 0 and info is not None and not numbers):
        raise ConfigError(f"--camera {camera}: give the camera number as in the file names (c1 = 1)")
    if numbers and camera not in numbers:
        raise ConfigError(f"--camera {camera}: the model was trained on cameras "
                          f"{', '.join(f'c{n}' for n in sorted(numbers))}; c{camera} has no trained embedding")
    return camera_row(camera, numbers)


__all__ = ["setup", "camera_id", "load_model", "load_tool_config", "checkpoint_input_opts"]
