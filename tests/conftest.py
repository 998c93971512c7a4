"""Test set-up: quiet progress bars, few threads, the session's tiny synthetic set (the ``slow``
marker is registered in pyproject.toml).

Two tiers: ``make test`` runs ``pytest -m "not slow"`` (every module's quick tests, about half a
minute); ``make test-all`` (what CI runs) adds the tests marked ``slow``: end-to-end
trainings, subprocesses, ONNX export and the demo. Shared helpers live in tests/helpers.py.
"""
import logging
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("SVLLREID_NO_TQDM", "1")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny synthetic Market-format set (8 train ids, 4 test ids, 64x32 images)."""
    from tests.helpers import synthetic_set
    return synthetic_set(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(autouse=True)
def fresh_project_logger() -> Iterator[None]:
    """After each test, the ``svllreid`` logger is as a new process has it: the handlers that
    ``setup_logger`` bound to that test's captured output are removed (a later test logging
    before its own set-up would write to a closed stream), whichever tests the tier selects."""
    yield
    log = logging.getLogger("svllreid")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.NOTSET)
    log.propagate = True
