"""Yes/no switches as written in configs (``'yes'``/``'no'``, ``'on'``/``'off'``, booleans)."""
from __future__ import annotations

from typing import Any

__all__ = ["is_yes", "BOOL_WORDS"]

BOOL_WORDS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}


def is_yes(value: Any) -> bool:
    """A yes/no switch as a bool: True/'yes'/'on'/'true' are on, False/'no'/'off'/'false' off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in BOOL_WORDS:
        return BOOL_WORDS[value.lower()]
    raise ValueError(f"expected a yes/no switch, got {value!r}")
