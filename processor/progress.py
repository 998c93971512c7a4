"""Progress bars: drawn on a terminal, silent in logs (``SVLLREID_PROGRESS``)."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm

from config import ConfigError
from utils.dist import is_main_process

__all__ = ["PROGRESS_ENV", "PROGRESS_CHOICES", "progress_enabled", "progress"]

PROGRESS_ENV = "SVLLREID_PROGRESS"
PROGRESS_CHOICES = ("auto", "on", "off")


def progress_enabled() -> bool:
    """Whether progress bars are drawn: ``SVLLREID_PROGRESS`` = auto (default) / on / off.

    ``auto`` draws them only when stderr is a terminal, so redirected output stays one log
    line per period (the tests and benchmarks set ``off``). Only the main process draws.
    """
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in PROGRESS_CHOICES:
        raise ConfigError(f"{PROGRESS_ENV} = {mode!r} is not allowed; choose one of: "
                         f"{', '.join(map(repr, PROGRESS_CHOICES))}")
    if mode == "off" or not is_main_process():
        return False
    return mode == "on" or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def progress(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    """A tqdm bar over ``iterable`` (a silent pass-through when :func:`progress_enabled` is false)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not progress_enabled())
