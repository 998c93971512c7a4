"""``make gpu-check``: the CUDA acceptance suite (every test here is marked ``cuda``).

Without a CUDA GPU each module skips itself, one line each (:func:`check_device`). ``SVLLREID_GPU_CHECK_DEVICE=cpu``
runs what can run on the CPU (a dry run of the suite itself; the CUDA-only checks skip). The
environment (torch, Triton, driver, device, peak, C compiler) is printed in the header, and what
the checks measure (syncs found, the deterministic mode's cost, graph breaks) is printed at the
end and written to ``$SVLLREID_GPU_CHECK_REPORT`` (default ``output/gpu_check.md``).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from utils.device_info import environment

_LINES: list[str] = []


def check_device() -> torch.device | None:
    """The device the suite checks: CUDA when present (or as SVLLREID_GPU_CHECK_DEVICE says), else None."""
    wanted = os.environ.get("SVLLREID_GPU_CHECK_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda") if torch.cuda.is_available() else None


def pytest_report_header(config: pytest.Config) -> list[str]:
    device = check_device()
    if device is None:
        return ["gpu-check: no CUDA GPU here, every test of tests/gpu is skipped"]
    return ["gpu-check environment:", *(f"  {k}: {v}" for k, v in environment(device).items())]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cuda)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _LINES:
        return
    terminalreporter.write_sep("=", "gpu-check measurements")
    for line in _LINES:
        terminalreporter.write_line(line)
    path = os.environ.get("SVLLREID_GPU_CHECK_REPORT", os.path.join("output", "gpu_check.md"))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    device = check_device()
    env = environment(device) if device is not None else {}
    with open(path, "w") as f:
        f.write("# make gpu-check\n\n" + "".join(f"* {k}: {v}\n" for k, v in env.items()) + "\n")
        f.write("".join(f"{line}\n" for line in _LINES))
    terminalreporter.write_line(f"(written to {path})")


@pytest.fixture(scope="session")
def device() -> torch.device:
    d = check_device()
    assert d is not None
    return d


@pytest.fixture
def cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("a CUDA-only check (this is a dry run on the CPU)")


@pytest.fixture(scope="session")
def report() -> Iterator[list[str]]:
    """Lines for the end-of-run summary and the report file."""
    yield _LINES
