"""What every command-line entry point shares: one line for an error, a Ctrl-C or a SIGTERM,
never a traceback.

Signals come in two phases:

* start-up (imports, argument parsing): :func:`guard_startup`, called by every entry point
  before its heavy imports, makes either signal print one line and exit at once;
* the work (inside :func:`utils.cli.run`): :func:`work_signals` turns SIGINT into
  ``KeyboardInterrupt`` and SIGTERM into :class:`Terminated` (a ``KeyboardInterrupt``), so the
  same clean-up and the same "where it stopped / how to go on" line serve both.

Exit codes: 2 for a user error, 130 for Ctrl-C, 143 for SIGTERM (the shell's 128 + signal
number). Stdlib only, so that it can be imported before anything slow; :mod:`utils.cli` adds
the project's user-error classes.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised like a Ctrl-C so the run stops the same way (exit code 143)."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (whitespace runs folded).

    An error raised in a DataLoader worker reaches the main process re-raised with the worker's
    whole traceback as its message ("Caught OSError in DataLoader worker process 0. Original
    Traceback ..."); its one line is the original error's message, the traceback's last line.
    """
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        text = message if sep and " " not in name else last
    return " ".join(text.split()) or type(e).__name__


def run_command(fn: Callable[[], object], user_errors: tuple[type[BaseException], ...],
                on_interrupt: Callable[[], str] | None = None) -> int:
    """Call ``fn`` with :func:`work_signals`; return its exit code.

    One of ``user_errors`` is printed as ``error: ...`` on stderr (exit code 2), unless it is
    marked ``silent`` (utils.errors.ReportedElsewhere: another process prints it); Ctrl-C or
    SIGTERM print one line (``on_interrupt()`` says where the work stopped and how to go on)
    and give 130 or 143.
    """
    try:
        with work_signals():
            fn()
    except user_errors as e:
        if not getattr(e, "silent", False):      # another process of the job prints this one
            say(f"error: {one_line(e)}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        where = on_interrupt() if on_interrupt is not None else ""
        say(f"{headline(e)}{': ' + where if where else ''}")
        return exit_code(e)
    return 0


def say(line: str) -> None:
    """``line`` and its newline to stderr in one write: the lines of processes that share a console
    (torchrun's ranks, even with PYTHONUNBUFFERED) never run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler of the work phase: raise :class:`Terminated`."""
    raise Terminated()


def exit_code(e: KeyboardInterrupt) -> int:
    """130 for a Ctrl-C, 143 for a SIGTERM."""
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


def headline(e: KeyboardInterrupt) -> str:
    """The first word(s) of the one-line message: ``interrupted`` or ``terminated (SIGTERM)``."""
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


def _exit_during_startup(signum: int, frame: FrameType | None) -> None:
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{what} while starting up; nothing was done\n")
        sys.stderr.flush()
    os._exit(code)   # half-imported modules have nothing to clean up; no traceback from inside an import


_STARTUP_HANDLERS = (_exit_during_startup,)


def guard_startup(module_name: str) -> None:
    """From now until :func:`work_signals`, Ctrl-C or SIGTERM exit at once with one line.

    Entry points call it with their ``__name__`` before their slow imports (torch takes
    seconds); it acts only when the module runs as the program (``__main__``), never when
    a test or another module imports it.
    """
    if module_name != "__main__" or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _exit_during_startup)
    signal.signal(signal.SIGTERM, _exit_during_startup)


@contextlib.contextmanager
def work_signals() -> Iterator[None]:
    """Inside the block SIGINT raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated`.

    The previous handlers come back afterwards (start-up handlers become the defaults: the
    program is finishing, not starting). Outside the main thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, raise_terminated)):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler in _STARTUP_HANDLERS or handler is None:
                handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler)


_deferring = False     # inside a signals_deferred block (nested blocks defer to the outermost)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM until the block is done, then raise it (``KeyboardInterrupt`` /
    :class:`Terminated`).

    Only a signal whose handler raises (``default_int_handler``, :func:`raise_terminated`) is
    held; nested blocks defer to the outermost one; outside the main thread it does nothing.
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    raising = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_terminated}
    held = [sig for sig, h in raising.items() if signal.getsignal(sig) is h]
    if not held:
        yield
        return
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in held}
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in got:
        raise Terminated()
    if got:
        raise KeyboardInterrupt

