"""Shared command-line behaviour of the scripts: user errors become one clear line.

Exit codes: 0 success, 2 a user error (bad config, data, checkpoint, a run that cannot
start or diverged; the message names the culprit), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM). Signals during start-up (imports) are handled by :mod:`utils.entry`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence

from .entry import one_line, run_command
from .errors import UserError

__all__ = ["USER_ERRORS", "run", "one_line", "parse_with_overrides", "python_command"]

# Bad configs, checkpoints that do not fit, missing/unreadable files and dataset folders,
# runs that cannot start or go on: the UserError family (ConfigError, CheckpointError,
# DatasetError, RunError, ...) and OSError.
USER_ERRORS = (UserError, OSError)


def run(fn: Callable[[], object], on_interrupt: Callable[[], str] | None = None) -> int:
    """Call ``fn``; a user error is printed as ``error: ...`` on stderr and gives exit code 2.

    Ctrl-C or SIGTERM print one line (``on_interrupt()`` says where the work stopped and how
    to go on) and give 130 or 143 (:func:`utils.entry.run_command`).
    """
    return run_command(fn, USER_ERRORS, on_interrupt)


_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*")   # a config key such as TEST.WEIGHT or OUTPUT_DIR


def _bracket_value(argv: Sequence[str], i: int) -> tuple[str | None, int]:
    """The value starting at ``argv[i]`` and the index after it. A list written with spaces, as
    documented (``[12, 17]``), reaches the program as the words ``[12,`` and ``17]``: words are
    joined while a bracket is open, so the value is ``[12, 17]`` as typed. None past the end."""
    if i >= len(argv):
        return None, i
    value, i = argv[i], i + 1
    while i < len(argv) and value.count("[") + value.count("(") > value.count("]") + value.count(")") \
            and not argv[i].startswith("--"):
        value, i = f"{value} {argv[i]}", i + 1
    return value, i


def _flags_first(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with every option moved before the trailing ``KEY VALUE`` overrides.

    Tokens are read in order: a known option (``--flag``, ``--opt VALUE`` or ``--opt=VALUE``)
    is taken with its arguments wherever it stands (an option of several values, ``nargs='+'``,
    takes them up to the next option or config ``KEY``); anything else starts a ``KEY VALUE``
    pair, whose value is never read as an option (values such as ``-0.5`` stay values).
    A token that looks like an option where a key is expected goes to argparse, which
    rejects an unknown one.
    """
    options = parser._option_string_actions
    flags: list[str] = []
    overrides: list[str] = []
    multi_last = False      # the last option takes several values: "--" ends them before the overrides
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-") and len(tok) > 1:
            name = tok.split("=", 1)[0]
            action = options.get(name)
            if action is None and parser.allow_abbrev:     # a unique prefix, as argparse allows
                hits = {a for o, a in options.items() if o.startswith(name) and o.startswith("--")}
                action = hits.pop() if len(hits) == 1 else None
            n = 0 if action is None or "=" in tok or action.nargs == 0 else \
                action.nargs if isinstance(action.nargs, int) else 1
            multi_last = action is not None and "=" not in tok and action.nargs in ("+", "*")
            if multi_last:
                n = 0       # every value up to the next option or config KEY
                while i + 1 + n < len(argv) and not argv[i + 1 + n].startswith("-") and \
                        not _CONFIG_KEY.fullmatch(argv[i + 1 + n]):
                    n += 1
            if n == 1 or (n == 0 and action is not None and "=" in tok):   # one value: a list may span words
                value, end = _bracket_value(argv, i + (n == 1))
                if value is not None:
                    flags += [*argv[i:i + (n == 1)], value]
                    i = end
                    continue
            flags += argv[i:i + 1 + n]
            i += 1 + n
        else:
            value, end = _bracket_value(argv, i + 1)
            overrides += [argv[i]] if value is None else [argv[i], value]
            i = end
    return flags + (["--"] if multi_last and overrides else []) + overrides


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a script's command line whose last positional is ``opts`` (``KEY VALUE`` overrides).

    The script's own options are accepted before, between and after the overrides, the same
    way for training, evaluation and every tool (argparse alone would take an option
    written after the first ``KEY`` as a config key).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(_flags_first(parser, args))
    if getattr(ns, "opts", None) and ns.opts[0] == "--":    # the end of a several-value option, not a key
        ns.opts = ns.opts[1:]
    return ns


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
