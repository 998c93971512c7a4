"""The user-error family: mistakes of the user (config, data, checkpoint, run folder), not bugs.

Every error a script reports as one ``error: ...`` line derives from :class:`UserError`
(:data:`utils.cli.USER_ERRORS`), so the command-line layer needs no knowledge of the rooms
that raise them. :class:`ConfigError` lives here because helpers at the ground (device choice,
the training record) refuse config values too; ``config`` re-exports it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["UserError", "ConfigError", "ReportedElsewhere", "import_extra", "brief"]


class UserError(Exception):
    """A failure caused by what the user gave (a value, a file, a folder); the message names it."""


class ConfigError(UserError, ValueError):
    """A configuration value is not allowed."""


class ReportedElsewhere(UserError):
    """A user error that another process of the same job reports: every process of a distributed
    run refuses, rank 0 prints the one line, and the others exit with the same code silently."""

    silent = True


def brief(e: BaseException | str, limit: int = 120) -> str:
    """A library's error message as a short reason inside our one-line errors: on one line, its
    first sentence only (torch's archive errors go on with advice meant for torch's developers),
    cut at a word with "..." past ``limit`` characters, never in the middle of a word."""
    text = " ".join(str(e).split()) or type(e).__name__
    first = text.split(". ", 1)[0].rstrip(".")
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


# The optional parts of the package and what they bring (pyproject.toml, optional-dependencies).
EXTRAS = {"export": "ONNX export and its onnxruntime check", "record": "pictures (curves, CMC, ranked lists)",
          "index": "gallery indexes (tools/build_index.py, tools/search.py --index)",
          "ablate": "the intervals of the ablation report (tools/ablate.py)"}


def import_extra(module: str, extra: str) -> ModuleType:
    """Import ``module`` of an optional extra, or refuse in one line saying what to install (the
    message names the top-level package: ``scipy``, not ``scipy.stats``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module.partition('.')[0]} is not installed; {EXTRAS[extra]} need it: "
                        f"pip install -e '.[{extra}]' (make installs every extra)") from None
