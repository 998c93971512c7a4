"""Test set-up: quiet progress bars, no CLIP weights download, few threads, the session's tiny
synthetic set (the ``slow`` marker is registered in pyproject.toml).

Two tiers: ``make test`` runs ``pytest -m "not slow"`` (every module's quick tests, about half a
minute); ``make test-all`` (what CI runs) adds the tests marked ``slow``: end-to-end
trainings, subprocesses, ONNX export and the demo. Shared helpers live in tests/helpers.py.
"""
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("SVLLREID_PROGRESS", "off")
os.environ.setdefault("SVLLREID_OFFLINE", "1")      # no test reaches the internet for CLIP weights


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


@pytest.fixture(scope="module")
def finished_run(tiny_root: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A complete tiny run (1 + 2 epochs), once per module; tests copy it before touching it."""
    import train_svllreid
    from tests.helpers import train_argv
    out = tmp_path_factory.mktemp("finished")
    assert train_svllreid.main(train_argv(tiny_root, out)) == 0
    return out


@pytest.fixture(scope="module")
def weight(tiny_root: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weights checkpoint of the tiny demo model (8 identities, 2 cameras): no training needed."""
    import torch

    from config import load_config
    from model import make_model
    from tests.helpers import DEMO, TOOL_SIZE
    cfg = load_config(DEMO, ["DATASETS.ROOT_DIR", tiny_root, *TOOL_SIZE])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save(make_model(cfg, num_class=8, camera_num=2, view_num=1).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def gallery_npz(tiny_root: str, weight: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Features of the tiny gallery (junk included) written by tools/extract_features.py with :func:`weight`."""
    from tests.helpers import DEMO, tool_opts
    from tools import extract_features
    out = tmp_path_factory.mktemp("feats") / "g.npz"
    assert extract_features.main(["--config_file", DEMO, "--images", os.path.join(tiny_root, "bounding_box_test"),
                                  "--out", str(out), *tool_opts(tiny_root, weight)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run: Any, tmp_path: Any) -> Any:
    """A copy of :func:`finished_run` to damage or resume."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst
