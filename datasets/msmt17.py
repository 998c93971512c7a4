"""MSMT17 (Wei et al., CVPR 2018): 4,101 identities, 15 cameras, list-file protocol."""
from __future__ import annotations

import os

from .bases import BaseImageDataset, DatasetLayoutError, Sample, report_unparsed, require_dirs, resolve_dataset_dir

__all__ = ["MSMT17"]

_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def _camera(relpath: str) -> int:
    """0-based camera from the file name's third ``_`` field (``0000_000_01_...`` -> 0)."""
    return int(os.path.basename(relpath).split("_")[2]) - 1


class MSMT17(BaseImageDataset):
    """``<root>/MSMT17/{train,test}`` + ``list_{train,val,query,gallery}.txt``.

    Each list line is ``relpath pid`` (relpath under ``train/`` for train/val, under
    ``test/`` for query/gallery). The training set is train + val (same identities).
    """

    name = "MSMT17"
    dataset_dir = "MSMT17"
    # torchreid / fast-reid docstrings: 32,621 (train + val) / 11,659 / 82,161 images, 15 cameras; the paper:
    # 1,041 training and 3,060 test identities
    published_stats = {"train": (1041, 32621, 15), "query": (3060, 11659, 15), "gallery": (3060, 82161, 15)}
    scheme = "'<pid dir>/PPPP_NNN_CC_... <pid>' lines, e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0'"

    def __init__(self, root: str = "../data", need_views: bool = False, test_only: bool = False) -> None:
        super().__init__()
        self.root = root
        dirs, lists = (("test",), _LISTS[2:]) if test_only else (("train", "test"), _LISTS)
        self.dataset_dir = resolve_dataset_dir(root, self.dataset_dir, dirs)
        require_dirs(self.name, self.dataset_dir, dirs, None if test_only else self.layout(root))
        missing = [f for f in lists if not os.path.isfile(os.path.join(self.dataset_dir, f))]
        if missing:
            where = ', '.join(os.path.join(self.dataset_dir, f) for f in missing)
            raise DatasetLayoutError(f"{self.name}: missing list file(s) {where}" + (
                " (evaluation needs the query and gallery lists)" if test_only
                else f".\nExpected layout:\n{self.layout(root)}"))
        train_dir = os.path.join(self.dataset_dir, "train")
        test_dir = os.path.join(self.dataset_dir, "test")
        if not test_only:
            self.set_train(self._parse_list(train_dir, "list_train.txt") + self._parse_list(train_dir, "list_val.txt"))
        self.query = self._parse_list(test_dir, "list_query.txt")
        self.gallery = self._parse_list(test_dir, "list_gallery.txt")
        self._finalize(test_only)

    @classmethod
    def layout(cls, root: str) -> str:
        return (f"  {os.path.join(root, cls.dataset_dir)}/\n"
                "      train/   test/   (<pid>/<PPPP_NNN_CC_...>.jpg)\n"
                "      list_train.txt  list_val.txt  list_query.txt  list_gallery.txt"
                "   ('relpath pid' per line)")

    def _parse_list(self, img_dir: str, list_name: str) -> list[Sample]:
        list_path = os.path.join(self.dataset_dir, list_name)
        samples, bad = [], []
        with open(list_path) as f:
            for line in f:
                fields = line.split()
                if not fields:
                    continue
                try:
                    relpath, pid, cam = fields[0], int(fields[1]), _camera(fields[0])
                    if cam < 0 or len(fields) != 2:
                        raise ValueError
                    samples.append((os.path.join(img_dir, relpath), pid, cam, 0))
                except (IndexError, ValueError):
                    bad.append(line.strip())
        report_unparsed(f"{self.name} {list_path}", bad, len(samples), what="lines",
                        scheme=self.scheme)
        if samples and not os.path.isfile(samples[0][0]):
            raise DatasetLayoutError(f"{self.name}: {list_name} names {samples[0][0]}, which "
                                     f"does not exist.\nExpected layout:\n{self.layout(self.root)}")
        return samples
