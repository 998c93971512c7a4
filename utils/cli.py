"""Shared command-line behaviour of the scripts: user errors become one clear line.

Exit codes: 0 success, 2 a user error (bad config, data, checkpoint, a run that cannot
start or diverged; the message names the culprit), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import sys
from typing import Callable

from config import ConfigError
from datasets.bases import DatasetError

from .checkpoint import CheckpointError
from .run_dir import RunError

# Bad configs, checkpoints that do not fit, missing/unreadable files and dataset folders,
# runs that cannot start or go on.
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, RunError, OSError)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (whitespace runs folded)."""
    return " ".join(str(e).split()) or type(e).__name__


def run(fn: Callable[[], object], on_interrupt: Callable[[], str] | None = None) -> int:
    """Call ``fn``; a user error is printed as ``error: ...`` on stderr and gives exit code 2.

    Ctrl-C prints one line (``on_interrupt()`` says where the work stopped) and gives 130.
    """
    try:
        fn()
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = on_interrupt() if on_interrupt is not None else ""
        print(f"interrupted{': ' + where if where else ''}", file=sys.stderr)
        return 130
    return 0
