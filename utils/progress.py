"""Whether progress bars are drawn (``SVLLREID_PROGRESS``): on a terminal, never in logs.

It lives at the ground floor so that every room decides the same way: the training and
evaluation loops (``processor/progress.py``) and the CLIP weights download (``model/clip``).
"""
from __future__ import annotations

import os
import sys

from .dist import is_main_process
from .errors import ConfigError

__all__ = ["PROGRESS_ENV", "PROGRESS_CHOICES", "progress_enabled"]

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
