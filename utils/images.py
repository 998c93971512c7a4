"""Image files: which files are images, and reading one as 8-bit RGB.

The one place that lists and reads pictures, shared by the datasets, folder inference, the
ONNX check and the evaluation pictures.
"""
from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "INPUT_EXTENSIONS", "list_images", "scan_images", "to_rgb", "read_image"]

# The extensions of the benchmark datasets' images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Files looked at in a user's folder: the dataset extensions plus other formats Pillow reads.
INPUT_EXTENSIONS = tuple(sorted(set(IMAGE_EXTENSIONS) | {".tif", ".tiff", ".webp", ".ppm", ".gif", ".pgm"}))


def list_images(root: str, recursive: bool = False, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted paths relative to ``root`` of the files in it whose extension is in ``extensions``
    (any case); with ``recursive``, of every such file under it. Empty when there is none."""
    if not recursive:
        return sorted(f for f in os.listdir(root) if f.lower().endswith(extensions))
    return scan_images(root, extensions)[0]


def _not_regular(path: str) -> str:
    """What the entry at ``path`` is, when it is not a regular file (why it is not read)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken link" if os.path.islink(path) else "cannot be read"
    if stat.S_ISFIFO(mode):
        return "a named pipe, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    return "not a regular file"


def scan_images(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                skip_folder: Callable[[str], str | None] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """(sorted paths relative to ``root`` of every image file under it; what was passed over and why).

    Linked sub-folders are followed, each real folder once: a link back to a folder above it (a
    loop) or to a folder already listed is passed over, so no image is listed twice and the walk
    ends. Only regular files are images: a named pipe, socket, device or broken link with an
    image's name is passed over (reading a pipe would wait forever). ``skip_folder(path)`` gives a
    reason to leave a sub-folder out, or None. A sub-folder that cannot be read is passed over too.
    Passed-over entries are (relative path, reason); folders end with the path separator.
    """
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, str] = {}              # real folder -> the relative path it was listed under
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        real = os.path.realpath(path)
        if real in seen:
            first = seen[real] or "."
            loop = not seen[real] or rel.startswith(seen[real] + os.sep)
            skipped.append((rel + os.sep, f"a loop, a link back to {first}" if loop else
                            f"the same folder as {first}, listed once"))
            continue
        seen[real] = rel
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not rel:
                raise
            skipped.append((rel + os.sep, f"cannot be read: {e.strerror or e}"))
            continue
        below = []
        for e in entries:
            sub = os.path.join(rel, e.name) if rel else e.name
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                why = skip_folder(e.path) if skip_folder is not None else None
                if why:
                    skipped.append((sub + os.sep, why))
                else:
                    below.append(sub)
            elif e.name.lower().endswith(extensions):
                try:
                    regular = e.is_file()
                except OSError:
                    regular = False
                if regular:
                    files.append(sub)
                else:
                    skipped.append((sub, _not_regular(e.path)))
        stack += reversed(below)
    return sorted(files), skipped


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


