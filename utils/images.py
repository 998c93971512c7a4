"""Image files: which files are images, and reading one as 8-bit RGB.

The one place that lists and reads pictures, shared by the datasets, folder inference, the
ONNX check and the evaluation pictures.
"""
from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "INPUT_EXTENSIONS", "list_images", "to_rgb", "read_image"]

# The extensions of the benchmark datasets' images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Files looked at in a user's folder: the dataset extensions plus other formats Pillow reads.
INPUT_EXTENSIONS = tuple(sorted(set(IMAGE_EXTENSIONS) | {".tif", ".tiff", ".webp", ".ppm", ".gif", ".pgm"}))


def list_images(root: str, recursive: bool = False, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted paths relative to ``root`` of the files in it whose extension is in ``extensions``
    (any case); with ``recursive``, of every such file under it. Empty when there is none."""
    if not recursive:
        return sorted(f for f in os.listdir(root) if f.lower().endswith(extensions))
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.lower().endswith(extensions)]
    return sorted(out)


def to_rgb(img: Image.Image, path: str = "image") -> Image.Image:
    """``img`` as 8-bit RGB, whatever mode Pillow opened it in.

    Pillow's ``convert('RGB')`` clips 16-bit and 32-bit grey images at 255 (a 16-bit PNG
    becomes white), so those are scaled: 16-bit by 1/257, integer images by their range,
    float images in [0, 1] by 255. Anything else that cannot be mapped is refused by name.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0
        elif a.size and (a.min() < 0 or a.max() > 65535):
            raise OSError(f"cannot read image {path!r}: {img.mode} values outside 0..65535")
        elif img.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif a.size and a.max() > 255:
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def read_image(path: str, retries: int = 3, delay: float = 0.1) -> Image.Image:
    """Read ``path`` as an 8-bit RGB PIL image (any mode Pillow opens, see :func:`to_rgb`).

    A missing or unreadable/corrupt file is retried ``retries`` times with a short sleep
    (transient network-filesystem errors), then an ``OSError`` naming the file is raised.
    An image beyond Pillow's decompression-bomb limit is refused at once.
    """
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img, path)
        except Image.DecompressionBombError as e:
            raise OSError(f"cannot read image {path!r}: {' '.join(str(e).split())}") from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL decode errors vary by format
            last = e
            if attempt < retries:
                time.sleep(delay)
    raise OSError(f"cannot read image {path!r} after {retries + 1} attempts: {last}") from last


