"""Summary statistics over seeds: mean, sample standard deviation, and Welch's 95% interval
for a difference of means (used by the ablation report; the interval needs scipy, the ``ablate``
extra, imported when it is computed)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import import_extra

__all__ = ["Summary", "summarize", "welch_interval"]


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof 1; NaN for fewer than two values) of ``n`` values."""

    n: int
    mean: float
    std: float


def summarize(values: Sequence[float]) -> Summary:
    """The :class:`Summary` of ``values`` (NaN mean for none)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return Summary(0, math.nan, math.nan)
    return Summary(int(a.size), float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95
                   ) -> tuple[float, float, float]:
    """(difference, low, high): ``mean(a) - mean(b)`` with Welch's t interval at ``level``.

    Welch's interval does not assume equal variances; the degrees of freedom follow
    Welch-Satterthwaite. Needs at least two values on each side, else the bounds are NaN.
    When both sides have zero spread the interval is the difference itself.
    """
    sa, sb = summarize(a), summarize(b)
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return diff, math.nan, math.nan
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = float(import_extra("scipy.stats", "ablate").t.ppf(0.5 + level / 2, df)) * se
    return diff, diff - half, diff + half
