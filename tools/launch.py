"""torchrun for this project's scripts: the same options, with one-line refusals and plain exit codes.

    python tools/launch.py --standalone --nproc_per_node 2 tools/extract_features.py \\
        --config_file CFG --images DIR --out PARTS/ --merge feats.npz TEST.WEIGHT ckpt.pth

It takes torchrun's command line (``torchrun`` / ``python -m torch.distributed.run``: --nnodes,
--nproc_per_node, --standalone, the rendezvous options, ...) and starts the processes as torchrun
does. What differs:

* Before any process starts, the sizes and the script are checked (a count torchrun cannot use, a
  script that is not there), and a script of this project that defines ``check_launch(argv, world)``
  (tools/extract_features.py, train_svllreid.py, test_svllreid.py) checks its command line once: a
  refusal is one ``error:`` line and nothing starts.
* A process that refuses prints its one ``error:`` line (rank 0 alone when they all refuse the
  same), and the launcher adds nothing: it exits with that code (2 a refusal, 130 Ctrl-C, 143
  SIGTERM), where torchrun prints its ChildFailedError report after the line and exits 1.
* A process that ends another way (a crash, a signal) gets one line naming its rank and exit code
  or signal, after its own output.

torchrun's own log lines are left out unless LOGLEVEL is set (as torchrun reads it).
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from utils import cli
from utils.entry import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USER_ERROR
from utils.errors import UserError, brief
from utils.logger import setup_logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Exit codes whose process has said why in its own line: the launcher adds nothing.
SAID = (EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED)


def script_module(args: Any) -> str | None:
    """The module name of the launched script when it is one of this project's (``tools/x.py`` ->
    ``tools.x``; ``-m tools.x`` as given), else None."""
    if args.no_python:
        return None
    if args.module:
        return str(args.training_script)
    path = os.path.realpath(args.training_script)
    rel = os.path.relpath(path, ROOT)
    if rel.startswith(os.pardir) or not rel.endswith(".py") or not os.path.isfile(path):
        return None
    return rel[:-3].replace(os.sep, ".")


def sizes(args: Any) -> tuple[int, int, int]:
    """(fewest machines, most machines, processes per machine) of the command line, each refused in
    one line when torchrun could not start with it (it asserted or raised deep inside instead)."""
    try:
        low, high = torchrun.parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        low = high = 0
    if not 0 < low <= high:
        raise UserError(f"--nnodes {args.nnodes}: give the number of machines, 1 or more, or a range MIN:MAX "
                        "with 1 <= MIN <= MAX")
    try:
        local = torchrun.determine_local_world_size(args.nproc_per_node)
    except ValueError as e:      # a word torchrun does not know, or gpu where CUDA is not available
        why = "not a process count" if str(e).startswith("Unsupported") else brief(e)
        raise UserError(f"--nproc_per_node {args.nproc_per_node}: {why}; give 1 or more processes per machine, "
                        "or auto, cpu or gpu") from None
    if local < 1:
        raise UserError(f"--nproc_per_node {args.nproc_per_node}: give 1 or more processes per machine "
                        "(or auto, cpu or gpu)")
    return low, high, local


def check_script(args: Any) -> None:
    """A Python script that is not there is one line here, not the interpreter's line once per process."""
    if args.module or args.no_python or os.path.isfile(args.training_script):
        return
    raise UserError(f"no such script: {args.training_script} (a path from {os.getcwd()})")


def world_size(args: Any) -> int | None:
    """The number of processes, when it is fixed before they meet (not an elastic MIN:MAX range)."""
    low, high, local = sizes(args)
    return low * local if low == high else None


def check_before_start(args: Any) -> None:
    """The script's ``check_launch(argv, world)``, when it has one: its refusal is raised here."""
    name = script_module(args)
    if name is None:
        return
    try:
        module = importlib.import_module(name)
    except ImportError:
        return
    check = getattr(module, "check_launch", None)
    if check is not None:
        check(list(args.training_script_args), world_size(args))


class _TorchrunQuiet(logging.Filter):
    """Leaves out torchrun's own log lines (it reports every failed process at length)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("torch.distributed") or record.levelno >= logging.CRITICAL


def failure_code(e: ChildFailedError) -> int:
    """The exit code of the first process that failed; one line for a failure it did not explain."""
    rank, failure = e.get_first_failure()
    code = int(failure.exitcode)
    if code in SAID:
        return code
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        print(f"error: rank {rank} (pid {failure.pid}) was stopped by {name}", file=sys.stderr)
        return 128 - code
    print(f"error: rank {rank} (pid {failure.pid}) exited with code {code}; its output above says why",
          file=sys.stderr)
    return code


def launch(args: Any) -> int:
    """Check, start the processes as torchrun does, and return the job's exit code."""
    world_size(args)
    check_script(args)
    check_before_start(args)
    if "LOGLEVEL" not in os.environ:
        for name in ("torch", "torch.distributed"):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(_TorchrunQuiet())
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        return failure_code(e)
    except SignalException as e:          # Ctrl-C or SIGTERM to the launcher: the processes said where
        return EXIT_TERMINATED if e.sigval == signal.SIGTERM else EXIT_INTERRUPTED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logger("svllreid", None, if_train=False)
    code = [0]

    def work() -> None:
        code[0] = launch(args)
    return cli.run(work) or code[0]


if __name__ == "__main__":
    sys.exit(main())
