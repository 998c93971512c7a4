"""Logging to the console and ``OUTPUT_DIR/<name>.log`` (main process only writes the file)."""
from __future__ import annotations

import logging
import os
import sys

from .fileio import append_error


class _BarSafeHandler(logging.StreamHandler):
    """A console handler that lifts active progress bars off the terminal while it writes a line
    (otherwise a log line is glued to the end of a bar line). Each record goes out whole, newline
    included, in one write: the lines of processes that share a console (torchrun's ranks, even
    unbuffered) never run into each other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record) + self.terminator, file=self.stream, end="")
            self.flush()
        except Exception:   # logging must never raise
            self.handleError(record)


class _LogFileHandler(logging.FileHandler):
    """A log file that stops the run on a write error (a full disk) with one error naming the
    file, instead of logging's traceback for every later line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            self.failed = True
            raise append_error(self.baseFilename, e) from None
        super().handleError(record)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            if not self.failed:
                raise

    def close(self) -> None:
        try:
            super().close()
        except OSError:   # the buffered rest of a line that already failed is dropped
            if not self.failed:
                raise


def setup_logger(name: str, save_dir: str | None, if_train: bool, is_main: bool = True) -> logging.Logger:
    """Configure the ``name`` logger once: INFO to stdout on the main process, and a log file."""
    logger = logging.getLogger(name)
    if not is_main:   # other ranks: only errors from third-party loggers (timm, torch, ...)
        logging.getLogger().setLevel(logging.ERROR)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    # the other ranks' warnings and errors say whose they are (torchrun's RANK)
    rank = "" if is_main else f" rank {os.environ.get('RANK', '?')}"
    fmt = logging.Formatter(f"%(asctime)s %(name)s{rank} %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    ch = _BarSafeHandler(stream=sys.stdout)
    ch.setFormatter(fmt)
    logger.addHandler(ch)
    if save_dir and is_main:
        os.makedirs(save_dir, exist_ok=True)
        fh = _LogFileHandler(os.path.join(save_dir, "train_log.txt" if if_train else "test_log.txt"), mode="a")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger
