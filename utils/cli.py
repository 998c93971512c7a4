"""Shared command-line behaviour of the scripts: user errors become one clear line.

Exit codes: 0 success, 2 a user error (bad config, data, checkpoint, a run that cannot
start or diverged; the message names the culprit), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM). Signals during start-up (imports) are handled by :mod:`utils.entry`.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Callable

from config import ConfigError
from datasets.bases import DatasetError

from .checkpoint import CheckpointError
from .run_dir import RunError
from .entry import one_line, run_command

__all__ = ["USER_ERRORS", "run", "one_line", "python_command"]

# Bad configs, checkpoints that do not fit, missing/unreadable files and dataset folders,
# runs that cannot start or go on.
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, RunError, OSError)


def run(fn: Callable[[], object], on_interrupt: Callable[[], str] | None = None) -> int:
    """Call ``fn``; a user error is printed as ``error: ...`` on stderr and gives exit code 2.

    Ctrl-C or SIGTERM print one line (``on_interrupt()`` says where the work stopped and how
    to go on) and give 130 or 143 (:func:`utils.entry.run_command`).
    """
    return run_command(fn, USER_ERRORS, on_interrupt)


def python_command() -> str:
    """How to call this interpreter in a hint printed to the user, runnable as printed:
    ``.venv/bin/python`` (relative to the current folder) for the project's virtual
    environment, ``python`` when that is the one on PATH, else the full path."""
    exe = sys.executable or "python"
    on_path = shutil.which("python")
    if on_path and os.path.abspath(on_path) == os.path.abspath(exe):
        return "python"
    rel = os.path.relpath(os.path.abspath(exe))
    return rel if not rel.startswith(os.pardir) else exe
