"""datasets.resample.resize_rgb against Pillow's Image.resize, pixel for pixel.

The loaders resize with it instead of Pillow, so every pixel must be Pillow's: random sizes up and
down on both axes (the width-first and the height-first pass orders, one axis only, no change),
one-pixel edges, both filters, on noise (which shows any weight or rounding difference) and on
photo-like images, and read-only input as ``np.asarray`` of a PIL image gives it.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import datasets.resample as rs
from datasets.resample import resize_image, resize_rgb

PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _pillow(a: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Pillow's resize of (H, W, 3) ``a`` to ``size`` (h, w), as (3, h, w)."""
    out = Image.fromarray(a).resize((size[1], size[0]), PIL_FILTERS[interpolation])
    return np.asarray(out).transpose(2, 0, 1)


def _assert_pillow(a: np.ndarray, size: tuple[int, int], interpolation: str) -> None:
    got = resize_rgb(a, size, interpolation)
    want = _pillow(a, size, interpolation)
    assert got.shape == want.shape and got.dtype == np.uint8 and got.flags.c_contiguous
    if not np.array_equal(got, want):
        diff = np.abs(got.astype(int) - want.astype(int))
        pytest.fail(f"{interpolation} {a.shape[:2]} -> {size}: {int((diff > 0).sum())} pixels differ, "
                    f"by up to {int(diff.max())}")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_random_sizes_equal_pillow(interpolation):
    rng = np.random.default_rng(7 if interpolation == "bilinear" else 8)
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        out = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        _assert_pillow(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), out, interpolation)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("src, out", [
    ((128, 64), (256, 128)),     # Market-1501 to the published input size: 2x up
    ((300, 100), (256, 128)),    # height down, width up: width first
    ((900, 120), (256, 128)),    # the height shrinks more than twice the width: height first
    ((700, 40), (64, 300)),      # height first, then the width up
    ((50, 60), (50, 33)),        # the width only
    ((50, 60), (97, 60)),        # the height only
    ((37, 29), (37, 29)),        # no change: a copy
    ((1, 1), (5, 3)), ((5, 3), (1, 1)), ((1, 9), (4, 1)), ((2, 2), (384, 1)),
])
def test_edge_sizes_equal_pillow(interpolation, src, out):
    rng = np.random.default_rng(sum(src) + sum(out))
    _assert_pillow(rng.integers(0, 256, (*src, 3), dtype=np.uint8), out, interpolation)
    flat = np.full((*src, 3), 255, np.uint8)              # bicubic overshoots: clipped at 255 as Pillow does
    flat[::2] = 0
    _assert_pillow(flat, out, interpolation)


def test_photo_like_and_read_only_input():
    y, x = np.mgrid[0:211, 0:83] / np.array([211, 83])[:, None, None]
    img = np.clip(np.stack([np.sin(7 * x), np.cos(5 * y), x * y], -1) * 120 + 128, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    view = np.asarray(pil)                                # what the transforms pass: read-only
    assert not view.flags.writeable
    for interpolation in PIL_FILTERS:
        _assert_pillow(view, (256, 128), interpolation)
        strided = img[::2, ::3]                           # not contiguous
        _assert_pillow(strided, (64, 50), interpolation)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_image_equals_pillow_on_both_sides_of_the_size_switch(interpolation, monkeypatch):
    """Small images go through the compiled kernel, large ones through Pillow: the same pixels."""
    rng = np.random.default_rng(11)
    monkeypatch.setattr(rs, "COMPILED_MAX_PIXELS", 40 * 40)
    compiled = []
    monkeypatch.setattr(rs, "resize_rgb", lambda a, *args: compiled.append(a.shape) or resize_rgb(a, *args))
    for h, w in ((40, 40), (41, 40), (300, 150)):                # at, just above and well above the switch
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = resize_image(Image.fromarray(a), (64, 32), interpolation)
        assert got.flags.c_contiguous and np.array_equal(got, _pillow(a, (64, 32), interpolation))
    assert compiled == [(40, 40, 3)]
    with pytest.raises(ValueError, match="RGB"):
        resize_image(Image.fromarray(a[..., 0]), (64, 32), interpolation)


def test_bad_arguments_are_refused():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="nearest"):
        resize_rgb(a, (2, 2), "nearest")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        resize_rgb(a[..., :1], (2, 2), "bilinear")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        resize_rgb(a.astype(np.float32), (2, 2), "bilinear")
    with pytest.raises(ValueError, match="positive"):
        resize_rgb(a, (0, 2), "bilinear")


# A new process resizes with the module and checks Pillow's pixels ("same pixels" on stdout).
_RESIZE_IN_A_PROCESS = (
    "import numpy as np\n"
    "from PIL import Image\n"
    "from datasets.resample import resize_rgb\n"
    "a = np.random.default_rng(0).integers(0, 256, (30, 17, 3), dtype=np.uint8)\n"
    "want = np.asarray(Image.fromarray(a).resize((9, 41), Image.Resampling.BICUBIC)).transpose(2, 0, 1)\n"
    "assert np.array_equal(resize_rgb(a, (41, 9), 'bicubic'), want)\n"
    "print('same pixels')\n")


@pytest.mark.slow
def test_without_a_writable_cache_folder_it_compiles_in_the_process():
    """Where numba finds no writable cache folder (a read-only install, no home), importing the
    module still works: the kernels are compiled in the process, with the same pixels."""
    import subprocess
    import sys
    code = "import numba.core.caching as c; c.CacheImpl._locator_classes = []\n" + _RESIZE_IN_A_PROCESS
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "same pixels" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_damaged_cache_is_compiled_again_with_one_warning(tmp_path):
    """numba's cache files cut short, overwritten with random bytes or emptied: the next process
    compiles again with one warning line (not numba's traceback), gives the same pixels, and
    rewrites the cache, so the process after it starts quietly."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))

    def run() -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-c", _RESIZE_IN_A_PROCESS], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0 and "same pixels" in proc.stdout, proc.stderr[-2000:]
        return proc
    assert run().stderr == ""                                       # compiled, cache written
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith((".nbi", ".nbc")))
    assert len(files) >= 8
    rng = np.random.default_rng(1)
    for i, path in enumerate(files):            # each kernel's index and data damaged one way or another
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write([data[:20], rng.integers(0, 256, len(data), dtype=np.uint8).tobytes(), b""][i % 3])
    lines = run().stderr.strip().splitlines()
    assert len(lines) == 1 and "cache of datasets/resample.py" in lines[0] and "compiled again" in lines[0], lines
    assert run().stderr == ""                                       # the rewritten cache loads
