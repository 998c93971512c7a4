"""VeRi-776 (Liu et al., ECCV 2016 / ICME 2016): 776 vehicles, 20 cameras, 8 orientations."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .bases import DatasetLayoutError, report_unparsed
from .market1501 import MarketStyleDataset

__all__ = ["VeRi", "read_keypoint_views"]

logger = logging.getLogger("svllreid")

KEYPOINT_FILES = ("keypoint_train.txt", "keypoint_test.txt")


def read_keypoint_views(path: str) -> dict[str, int]:
    """``basename -> view`` from a keypoint file of ``relpath x1 y1 ... orientation`` lines."""
    views, bad = {}, []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) < 2:
                    raise ValueError
                views[os.path.basename(fields[0])] = int(float(fields[-1]))
            except ValueError:
                bad.append(line.strip())
    report_unparsed(f"VeRi {path}", bad, len(views), what="lines",
                    scheme="'relpath x1 y1 ... x20 y20 orientation'")
    return views


class VeRi(MarketStyleDataset):
    """``<root>/VeRi/{image_train,image_query,image_test}``, names ``VVVV_cCCC_...jpg``.

    View ids come from ``<root>/VeRi/keypoint_train.txt`` and ``keypoint_test.txt``
    (last field of each line, keyed by the image's base name). Without them every view is
    0 (with a warning), and ``need_views=True`` (MODEL.SIE_VIEW) is an error.
    """

    name = "VeRi-776"
    dataset_dir = "VeRi"
    # fast-reid's docstring: 37,778 / 1,678 / 11,579 images; the paper: 576 training and 200 test vehicles,
    # 20 cameras
    published_stats = {"train": (576, 37778, 20), "query": (200, 1678, None), "gallery": (200, 11579, None)}
    subdirs = ("image_train", "image_query", "image_test")
    scheme = "VVVV_cCCC_FFFFFFFF_N.jpg, e.g. 0001_c001_00016450_0.jpg"

    @classmethod
    def layout(cls, root: str) -> str:
        return (super().layout(root)
                + "\n      keypoint_train.txt  keypoint_test.txt   (optional: view labels,"
                  " 'relpath x1 y1 ... orientation' per line)")

    def _view_labels(self, paths: list[str], need_views: bool) -> Callable[[str], int]:
        files = [os.path.join(self.dataset_dir, f) for f in KEYPOINT_FILES]
        views: dict[str, int] = {}
        for f in files:
            if os.path.isfile(f):
                views.update(read_keypoint_views(f))
        unlabelled = [p for p in paths if os.path.basename(p) not in views]
        if unlabelled:
            what = (f"{len(unlabelled)} of {len(paths)} images have no view label in "
                    f"{' / '.join(files)} (first: {os.path.basename(unlabelled[0])!r})")
            if need_views:
                raise DatasetLayoutError(
                    f"{self.name}: view labels are required (MODEL.SIE_VIEW) but {what}. Put the "
                    "VeRi keypoint files there or turn MODEL.SIE_VIEW off.\nExpected layout:\n"
                    + self.layout(self.root))
            logger.warning("%s: %s; their view id is 0", self.name, what)
        return lambda path: views.get(os.path.basename(path), 0)
