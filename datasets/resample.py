"""Pillow's resize of 8-bit RGB images, bit for bit, compiled with numba: the loaders' resize.

The published transforms resize with Pillow (bilinear for the test transform, bicubic for the
train one). In a loader process that resize is the largest CPU cost per image; this module
computes exactly what Pillow 13's ``Image.resize`` computes for an RGB image (its
``libImaging/Resample.c``: the same double-precision filter weights, the same 22-bit fixed-point
coefficients, the same rounding and clipping, the same pass order and row window), about four
times as fast on person crops, and gives the (3, H, W) tensor layout directly.
``tests/test_resample.py`` checks it against Pillow, pixel for pixel, over 800 random size pairs
up and down and the edge cases.

How it works: each output pixel along one axis is ``clip8((2^21 + sum_j w_j * p_j) >> 22)`` over
the input pixels ``p_j`` in its filter window, with integer weights ``w_j`` (the filter's normalised
weights times 2^22, rounded half away from zero). The image is split into its three planes and
every pass combines whole lines of a plane (one pass kernel, whose inner loop vectorises); the
pass along the width runs on the transposed planes. As in Pillow, the width goes first, on only
the rows the second pass reads, unless the height shrinks more than twice as much as the width,
and the first pass's result is rounded to 8 bits.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import numba
import numpy as np
from PIL import Image

__all__ = ["FILTERS", "COMPILED_MAX_PIXELS", "resize_image", "resize_rgb", "warm_up"]

PRECISION_BITS = 32 - 8 - 2
FILTERS = {"bilinear": (0, 1.0), "bicubic": (1, 2.0)}      # name -> (kernel id, support)
PILLOW_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Above this many input pixels (photos rather than person crops) Pillow's own resize is as fast or
# faster: its passes keep to the cache, while the plane transpositions here grow with the input.
# Measured on the 2-core machine, to 256x128: 1000x500 ours 1.8 ms / Pillow 2.1 ms, 1500x750 6.6 / 5.1.
COMPILED_MAX_PIXELS = 1 << 19


_damage_reported = False      # one warning per process, however many kernels' cache files are damaged


def _recompile_when_damaged(dispatcher):
    """Make a damaged cache file (truncated, random bytes, written by something else) cost a
    compilation and one warning, instead of numba's traceback on the first call: the kernel's
    cache index is emptied (so the fresh compilation is saved over it) and it compiles again."""
    cache = getattr(dispatcher, "_cache", None)
    load = getattr(cache, "load_overload", None)
    if load is None:
        return dispatcher

    def load_overload(sig, target_context):
        global _damage_reported
        try:
            return load(sig, target_context)
        except Exception as e:          # numba unpickles the files: any error means an unusable cache
            if not _damage_reported:
                _damage_reported = True
                logging.getLogger("svllreid").warning(
                    "numba's cache of datasets/resample.py in %s cannot be read (%s: %s): compiled again and "
                    "the cache rewritten", cache.cache_path, type(e).__name__, " ".join(str(e).split())[:120])
            try:
                cache.flush()           # an empty index: the new compilation is saved afresh
            except OSError:
                cache.disable()
            return None
    cache.load_overload = load_overload
    return dispatcher


def _compiled(fn):
    """``fn`` compiled by numba, kept in numba's on-disk cache (next to this file, else in the
    user's cache folder); where neither is writable, compiled afresh in each process instead. A
    damaged cache is compiled again, with one warning (:func:`_recompile_when_damaged`)."""
    try:
        return _recompile_when_damaged(numba.njit(cache=True)(fn))
    except RuntimeError:            # numba: "cannot cache function ...: no locator available"
        return numba.njit(fn)


@_compiled
def _filter(kind: int, x: float) -> float:
    if x < 0.0:
        x = -x
    if kind == 0:                                  # bilinear (triangle)
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5                                       # bicubic, a = -0.5 (Keys)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@_compiled
def _coefficients_kernel(in_size: int, out_size: int, kind: int, filter_support: float):
    scale = in_size / out_size
    filterscale = scale if scale >= 1.0 else 1.0
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int32)
    kk = np.zeros((out_size, ksize), np.int32)
    weights = np.zeros(ksize, np.float64)
    inv_filterscale = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        total = 0.0
        xmin = max(int(center - support + 0.5), 0)           # int(): truncation, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        for x in range(xmax):
            w = _filter(kind, (x + xmin - center + 0.5) * inv_filterscale)
            weights[x] = w
            total += w
        for x in range(xmax):
            w = weights[x] / total if total != 0.0 else weights[x]
            kk[xx, x] = int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS))
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, kk


@lru_cache(maxsize=4096)
def _coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """(bounds (out, 2): first input index and count; int32 weights (out, ksize)) of one axis."""
    kind, support = FILTERS[interpolation]
    return _coefficients_kernel(in_size, out_size, kind, support)


@_compiled
def _planes(hwc, transpose):
    """(H, W, 3) -> (3, H, W), or (3, W, H) with ``transpose``."""
    h, w, c = hwc.shape
    out = np.empty((c, w, h) if transpose else (c, h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                if transpose:
                    out[ch, x, y] = hwc[y, x, ch]
                else:
                    out[ch, y, x] = hwc[y, x, ch]
    return out


@_compiled
def _swap(planes):
    """(C, A, B) -> (C, B, A)."""
    c, a, b = planes.shape
    out = np.empty((c, b, a), np.uint8)
    for ch in range(c):
        for i in range(a):
            for j in range(b):
                out[ch, j, i] = planes[ch, i, j]
    return out


@_compiled
def _pass(planes, offset, bounds, kk):
    """Resample (C, A, B) ``planes`` along A: output line ``o`` of each plane is the clipped,
    rounded combination of input lines ``bounds[o, 0] - offset + j`` (j < ``bounds[o, 1]``) with
    weights ``kk[o, j]``. Whole lines are combined at once, so the inner loops vectorise."""
    c, a, b = planes.shape
    n_out = bounds.shape[0]
    out = np.empty((c, n_out, b), np.uint8)
    acc = np.empty(b, np.int32)
    for ch in range(c):
        for o in range(n_out):
            first = bounds[o, 0] - offset
            for i in range(b):
                acc[i] = 1 << (PRECISION_BITS - 1)
            for j in range(bounds[o, 1]):
                k = kk[o, j]
                line = planes[ch, first + j]
                for i in range(b):
                    acc[i] += np.int32(line[i]) * k
            line_out = out[ch, o]
            for i in range(b):
                v = acc[i] >> PRECISION_BITS
                line_out[i] = 0 if v < 0 else (255 if v > 255 else v)
    return out


def resize_rgb(hwc: np.ndarray, size: tuple[int, int] | list[int], interpolation: str) -> np.ndarray:
    """``Image.fromarray(hwc).resize((w, h), filter)`` of an (H, W, 3) uint8 RGB array, as a
    C-contiguous (3, h, w) uint8 array. ``size`` is (h, w); ``interpolation`` 'bilinear' or 'bicubic'."""
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation must be one of {sorted(FILTERS)}, got {interpolation!r}")
    if hwc.dtype != np.uint8 or hwc.ndim != 3 or hwc.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {hwc.dtype} {tuple(hwc.shape)}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {(out_h, out_w)}")
    hwc = np.ascontiguousarray(hwc)
    in_h, in_w = hwc.shape[:2]
    need_cols, need_rows = out_w != in_w, out_h != in_h
    if not need_cols:                                   # rows only (or nothing: Pillow copies)
        planes = _planes(hwc, False)
        return _pass(planes, 0, *_coefficients(in_h, out_h, interpolation)) if need_rows else planes
    cols = _coefficients(in_w, out_w, interpolation)
    if not need_rows:
        return _swap(_pass(_planes(hwc, True), 0, *cols))
    rows_b, rows_k = _coefficients(in_h, out_h, interpolation)
    if (in_h - out_h) > (in_w - out_w) * 2 and in_h > out_h:     # Pillow: the height first
        by_rows = _pass(_planes(hwc, False), 0, rows_b, rows_k)   # (3, out_h, in_w)
        return _swap(_pass(_swap(by_rows), 0, *cols))
    first, last = int(rows_b[0, 0]), int(rows_b[-1, 0] + rows_b[-1, 1])   # the rows the second pass reads
    by_cols = _swap(_pass(_planes(hwc[first:last], True), 0, *cols))    # (3, last - first, out_w)
    return _pass(by_cols, first, rows_b, rows_k)


def resize_image(img: Image.Image, size: tuple[int, int] | list[int], interpolation: str) -> np.ndarray:
    """``img.resize((w, h), filter)`` of an RGB PIL image as a C-contiguous (3, h, w) uint8 array:
    by :func:`resize_rgb` up to :data:`COMPILED_MAX_PIXELS` input pixels, by Pillow itself above
    (the same pixels either way, whichever is faster at that size)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    if img.width * img.height <= COMPILED_MAX_PIXELS:
        return resize_rgb(np.asarray(img), size, interpolation)
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation must be one of {sorted(FILTERS)}, got {interpolation!r}")
    out = img.resize((int(size[1]), int(size[0])), PILLOW_FILTERS[interpolation])
    return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel in this process, so that loader workers
    forked from it start with compiled code."""
    writable = np.zeros((4, 4, 3), np.uint8)
    readonly = writable.copy()
    readonly.flags.writeable = False           # what np.asarray gives for a PIL image
    for tiny in (writable, readonly):
        for size in ((8, 8), (8, 4), (4, 8), (1, 8), (4, 4)):
            resize_rgb(tiny, size, "bilinear")
