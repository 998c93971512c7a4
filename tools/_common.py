"""Set-up shared by the command-line tools: config, logging, device, the loaded model."""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import ConfigError, load_config  # noqa: E402
from utils.inference_io import load_model  # noqa: E402
from utils.logger import setup_logger  # noqa: E402
from utils.misc import resolve_device, set_cpu_threads  # noqa: E402


def setup(config_file: str, opts: Sequence[str]) -> tuple[Any, torch.device]:
    """(frozen config, device) with console logging; TEST.WEIGHT is required."""
    cfg = load_config(config_file, list(opts))
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: add TEST.WEIGHT path/to/checkpoint.pth after the options")
    setup_logger("svllreid", None, if_train=False)
    device = resolve_device(cfg.MODEL.DEVICE)
    if device.type == "cpu":
        set_cpu_threads(cfg.DATALOADER.NUM_WORKERS)
    return cfg, device


def camera_id(camera: int | None) -> int | None:
    """``--camera N`` (the number written in names, c1 = 1) -> 0-based camera id."""
    if camera is None:
        return None
    if camera < 1:
        raise ConfigError(f"--camera {camera}: give the camera number as in the file names (c1 = 1)")
    return camera - 1


__all__ = ["setup", "camera_id", "load_model"]
