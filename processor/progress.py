"""Progress bars: drawn on a terminal, silent in logs (``SVLLREID_PROGRESS``, decided by ``utils.progress``)."""
from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm

from utils.progress import PROGRESS_CHOICES, PROGRESS_ENV, progress_enabled

__all__ = ["PROGRESS_ENV", "PROGRESS_CHOICES", "progress_enabled", "progress"]


def progress(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    """A tqdm bar over ``iterable`` (a silent pass-through when :func:`progress_enabled` is false)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not progress_enabled())
