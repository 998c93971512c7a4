"""Shared command-line behaviour of the scripts: user errors become one clear line, exit code 2."""
from __future__ import annotations

import sys
from typing import Callable

from config import ConfigError

from .checkpoint import CheckpointMismatchError

# Bad configs, checkpoints that do not fit, missing/unreadable files and dataset folders.
USER_ERRORS = (ConfigError, CheckpointMismatchError, OSError)


def run(fn: Callable[[], object]) -> int:
    """Call ``fn``; a user error is printed as ``error: ...`` on stderr and gives exit code 2."""
    try:
        fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
