"""Market-1501 and the shared parser for every dataset in the Market naming scheme.

File names ``PPPP_cCsS_FFFFFF_NN.jpg``: person id ``PPPP`` (``-1`` = junk, skipped;
``0`` = distractor, kept), camera ``C`` (1-based in the file name, 0-based here).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

from .bases import BaseImageDataset, dataset_image_names, report_unparsed, require_dirs, resolve_dataset_dir

__all__ = ["MarketStyleDataset", "Market1501", "parse_market_name", "is_junk_name", "JUNK_PID"]

logger = logging.getLogger("svllreid")

_NAME = re.compile(r"^(-1|\d+)_c(\d+)")


def parse_market_name(name: str) -> tuple[int, int] | None:
    """``(pid, camera number as written)`` of a Market-scheme file name, else ``None``."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


JUNK_PID = -1   # badly cropped detections: left out of the evaluation (and of tools/search.py's gallery)


def is_junk_name(name: str) -> bool:
    """Whether a Market-scheme file name (a path's last part is used) marks a junk image (``-1_c...``)."""
    parsed = parse_market_name(os.path.basename(name))
    return parsed is not None and parsed[0] == JUNK_PID


class MarketStyleDataset(BaseImageDataset):
    """Three folders of Market-scheme images; subclasses set ``dataset_dir`` and ``name``.

    Cameras: ``c1..cN`` become ``0..N-1`` (``c0`` is reported as malformed), unless
    ``dense_cameras`` is set, in which case the sorted camera numbers seen in any subset
    are mapped onto ``0..C-1`` (for user data with arbitrary camera numbering).
    """

    dataset_dir = ""
    subdirs = ("bounding_box_train", "query", "bounding_box_test")
    dense_cameras = False
    scheme = "PPPP_cCsS_FFFFFF_NN.jpg, e.g. 0002_c1s1_000451_03.jpg"

    def __init__(self, root: str = "../data", need_views: bool = False, test_only: bool = False) -> None:
        super().__init__()
        needed = self.subdirs[1:] if test_only else self.subdirs     # test_only: query + gallery
        self.dataset_dir = resolve_dataset_dir(root, type(self).dataset_dir, needed)
        require_dirs(self.name, self.dataset_dir, needed, None if test_only else self.layout(root))
        self.root = root
        raw = {sub: self._parse_dir(os.path.join(self.dataset_dir, sub)) if sub in needed else []
               for sub in self.subdirs}
        train_dir = os.path.join(self.dataset_dir, self.subdirs[0])
        if test_only and self.dense_cameras and os.path.isdir(train_dir):
            # dense camera ids depend on every camera seen: keep them equal to the training run's
            seen = [c for _, _, c in self._parse_dir(train_dir)]
        else:
            seen = []
        cam_map = self._camera_map(seen + [c for items in raw.values() for _, _, c in items])
        view_of = self._view_labels([p for items in raw.values() for p, _, _ in items], need_views)
        train, query, gallery = ([(p, pid, cam_map[c], view_of(p)) for p, pid, c in raw[sub]]
                                 for sub in self.subdirs)
        self.set_train(train)
        self.camera_numbers = dict(cam_map)
        self.query = query
        self.gallery = gallery
        self._finalize(test_only)

    @classmethod
    def layout(cls, root: str) -> str:
        base = os.path.join(root, cls.dataset_dir) if cls.dataset_dir else root
        lines = [f"  {base}/"] + [f"      {d}/" for d in cls.subdirs]
        lines[1] += f"   ({cls.scheme})"
        return "\n".join(lines)

    def _view_labels(self, paths: list[str], need_views: bool) -> Callable[[str], int]:
        """Map an image path to its view id; this scheme has none, so every view is 0."""
        if need_views:
            logger.warning("%s has no view labels; every view id is 0", self.name)
        return lambda path: 0

    def _camera_map(self, cams: list[int]) -> dict[int, int]:
        if self.dense_cameras:
            return {c: i for i, c in enumerate(sorted(set(cams)))}
        return {c: c - 1 for c in set(cams)}

    def _parse_dir(self, dir_path: str) -> list[tuple[str, int, int]]:
        """``(path, pid, camera number)`` of every non-junk image, in sorted name order."""
        items, bad, n_junk = [], [], 0
        for name in dataset_image_names(dir_path):
            parsed = parse_market_name(name)
            if parsed is None or (parsed[1] == 0 and not self.dense_cameras):
                bad.append(name)
                continue
            pid, cam = parsed
            if pid == JUNK_PID:
                n_junk += 1
                continue
            items.append((os.path.join(dir_path, name), pid, cam))
        report_unparsed(f"{self.name} {dir_path}", bad, len(items) + n_junk, scheme=self.scheme)
        return items


class Market1501(MarketStyleDataset):
    """Market-1501 (Zheng et al., ICCV 2015): 1,501 identities, 6 cameras."""

    name = "Market-1501"
    dataset_dir = "Market-1501-v15.09.15"
    # images: the torchreid and fast-reid dataset docstrings; 751 / 750 identities and 6 cameras: the
    # paper. The gallery's identities (750 plus the distractors, id 0) have no published count here.
    published_stats = {"train": (751, 12936, 6), "query": (750, 3368, 6), "gallery": (None, 15913, 6)}

