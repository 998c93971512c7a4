"""What the benches share: timing contenders in alternating rounds, and the peak memory of a block
(CUDA allocator statistics, or sampled RSS on the CPU)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PeakMemory", "timed_round_robin"]


def timed_round_robin(cases: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call of every case, ``repeats`` rounds that alternate the cases (so that
    background load hits them alike), after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


class PeakMemory:
    """Peak memory (bytes) during a ``with`` block, in ``.peak``.

    CUDA: the most the allocator held during the block, minus what it held at the start when
    ``growth`` (the block's own tensors), else in all (everything alive: the model too).
    CPU: the peak growth of the process's RSS, sampled every 2 ms by a thread; None when psutil
    is not installed.
    """

    def __init__(self, device: torch.device, growth: bool = True) -> None:
        self.device, self.growth, self.peak = device, growth, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) if self.growth else 0
            return self
        try:
            import psutil
        except ImportError:
            return self
        self._proc = psutil.Process()
        self._base = self._max = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self._base
