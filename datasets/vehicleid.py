"""VehicleID (Liu et al., CVPR 2016): 13,164 train vehicles; test sets of 800/1,600/2,400.

The test protocol draws, for every test identity, one random image as the gallery and
keeps the others as queries (query camera 0, gallery camera 1); evaluation repeats
this over several trials. Trial ``t`` with seed ``s`` always gives the same split.
"""
from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from .bases import (
    BaseImageDataset,
    DatasetError,
    DatasetLayoutError,
    Sample,
    SplitStats,
    report_unparsed,
    require_dirs,
    resolve_dataset_dir,
)

__all__ = ["VehicleID"]

TEST_SIZES = (800, 1600, 2400)
# fast-reid's docstrings: 13,164 training vehicles in 113,346 images; the test lists of 800 / 1,600 / 2,400
# vehicles hold 6,493 / 13,377 / 19,777 images (one per vehicle goes to the gallery, the rest are queries)
TRAIN_STATS = (13164, 113346)
TEST_LIST_IMAGES = {800: 6493, 1600: 13377, 2400: 19777}


class VehicleID(BaseImageDataset):
    """``<root>/VehicleID_V1.0/{image,train_test_split}`` with ``name pid`` list files."""

    name = "VehicleID"
    dataset_dir = "VehicleID_V1.0"
    subdirs = ("image", "train_test_split")

    def __init__(self, root: str = "../data", test_size: int = 800, trial: int = 0,
                 seed: int = 0, need_views: bool = False, test_only: bool = False) -> None:
        super().__init__()
        self.root, self.test_size, self.trial, self.seed = root, int(test_size), trial, seed
        self.dataset_dir = resolve_dataset_dir(root, self.dataset_dir, self.subdirs)
        require_dirs(self.name, self.dataset_dir, self.subdirs, None if test_only else self.layout(root))
        self.img_dir = os.path.join(self.dataset_dir, "image")
        split_dir = os.path.join(self.dataset_dir, "train_test_split")
        train_list = os.path.join(split_dir, "train_list.txt")
        test_list = os.path.join(split_dir, f"test_list_{self.test_size}.txt")
        for path in (test_list,) if test_only else (train_list, test_list):
            if not os.path.isfile(path):
                raise DatasetLayoutError(f"{self.name}: missing {path} (test sizes: "
                                         f"{', '.join(map(str, TEST_SIZES))}).\n"
                                         f"Expected layout:\n{self.layout(root)}")
        if not test_only:
            self.set_train([(p, pid, 0, 0) for p, pid in self._parse_list(train_list)])
        self.query, self.gallery = self.split_test(self._parse_list(test_list), seed, trial)
        self._finalize(test_only)

    def published_statistics(self) -> dict[str, SplitStats] | None:
        """Train and the test list of ``test_size``; cameras are this parser's convention, not checked."""
        n, images = self.test_size, TEST_LIST_IMAGES.get(self.test_size)
        return {"train": (*TRAIN_STATS, None), "query": (n, images - n if images else None, None),
                "gallery": (n, n, None)}

    @classmethod
    def layout(cls, root: str) -> str:
        return (f"  {os.path.join(root, cls.dataset_dir)}/\n"
                "      image/              <name>.jpg\n"
                "      train_test_split/   train_list.txt  test_list_{800,1600,2400}.txt"
                "   ('name pid' per line)")

    def _parse_list(self, list_path: str) -> list[tuple[str, int]]:
        items, bad = [], []
        with open(list_path) as f:
            for line in f:
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                    bad.append(line.strip())
                    continue
                items.append((os.path.join(self.img_dir, fields[0] + ".jpg"), int(fields[1])))
        report_unparsed(f"{self.name} {list_path}", bad, len(items), what="lines",
                        scheme="'name pid', e.g. '0004424 2'")
        if not items:
            raise DatasetError(f"{self.name}: {list_path} lists no images")
        if not os.path.isfile(items[0][0]):
            raise DatasetLayoutError(f"{self.name}: {list_path} names {items[0][0]}, which does "
                                     f"not exist.\nExpected layout:\n{self.layout(self.root)}")
        return items

    @staticmethod
    def split_test(items: list[tuple[str, int]], seed: int, trial: int
                   ) -> tuple[list[Sample], list[Sample]]:
        """One random gallery image per identity (camera 1); the rest are queries (camera 0).

        Identities are visited in sorted pid order and images in list order, with a
        generator seeded from ``(seed, trial)``, so a split is reproducible.
        """
        by_pid: dict[int, list[str]] = defaultdict(list)
        for path, pid in items:
            by_pid[pid].append(path)
        rng = np.random.default_rng([int(seed), int(trial)])
        query, gallery = [], []
        for pid in sorted(by_pid):
            paths = by_pid[pid]
            g = int(rng.integers(len(paths)))
            gallery.append((paths[g], pid, 1, 0))
            query.extend((p, pid, 0, 0) for i, p in enumerate(paths) if i != g)
        return query, gallery
