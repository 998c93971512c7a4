"""The user-error family: mistakes of the user (config, data, checkpoint, run folder), not bugs.

Every error a script reports as one ``error: ...`` line derives from :class:`UserError`
(:data:`utils.cli.USER_ERRORS`), so the command-line layer needs no knowledge of the rooms
that raise them. :class:`ConfigError` lives here because helpers at the ground (device choice,
the training record) refuse config values too; ``config`` re-exports it.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError"]


class UserError(Exception):
    """A failure caused by what the user gave (a value, a file, a folder); the message names it."""


class ConfigError(UserError, ValueError):
    """A configuration value is not allowed."""
