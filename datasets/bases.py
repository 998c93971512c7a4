"""Shared dataset machinery: the sample record, the dataset base class, image reading.

A dataset is three lists of samples ``(img_path, pid, camid, viewid)``:
``train`` (pids relabelled to ``0..N-1``), ``query`` and ``gallery`` (original pids,
so that distractors (pid 0) stay distinguishable). Camera and view ids start at 0.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from utils.errors import UserError
from utils.images import IMAGE_EXTENSIONS, list_images, read_image

__all__ = [
    "Sample", "DatasetError", "DatasetLayoutError", "verify_images", "BaseImageDataset", "ImageDataset", "read_image",
    "relabel", "report_unparsed", "require_dirs", "resolve_dataset_dir", "dataset_image_names",
    "IMAGE_EXTENSIONS", "dataset_identity", "dataset_change", "renumber_cameras", "train_test_overlap",
    "SplitStats", "check_published_statistics",
]

logger = logging.getLogger("svllreid")

Sample = tuple[str, int, int, int]  # (img_path, pid, camid, viewid)
# The published (identities, images, cameras) of a split, as this project's parsers count them
# (junk -1 left out, distractors 0 kept as one identity); None: no published figure to compare.
SplitStats = tuple[int | None, int | None, int | None]



class DatasetError(UserError, ValueError):
    """A dataset's content cannot be used (no parsable names, an empty subset, bad ids, bad images)."""


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or not laid out as expected."""


def relabel(samples: Sequence[Sample]) -> list[Sample]:
    """Map pids onto ``0..N-1`` in sorted original-pid order; order of samples is kept."""
    pid2label = {pid: i for i, pid in enumerate(sorted({s[1] for s in samples}))}
    return [(p, pid2label[pid], cam, view) for p, pid, cam, view in samples]


def report_unparsed(where: str, bad: Sequence[str], n_good: int, what: str = "file names",
                    scheme: str = "") -> None:
    """Warn about entries that do not follow the naming scheme; error if nothing parsed.

    ``bad`` holds the offending names (or lines). Only the count and the first few
    examples are reported.
    """
    if not bad:
        return
    examples = ", ".join(repr(b) for b in list(bad)[:5])
    hint = f" (expected {scheme})" if scheme else ""
    msg = f"{where}: {len(bad)} {what} do not match the naming scheme{hint}; first: {examples}"
    if n_good == 0:
        raise DatasetError(msg + "; nothing could be parsed")
    logger.warning(msg + "; skipped")


class BaseImageDataset:
    """Holds ``train``/``query``/``gallery`` and their statistics; subclasses parse files.

    Subclasses fill the three lists and call :meth:`_finalize`, which validates them,
    computes the counts and logs the statistics table.

    ``num_train_cams`` / ``num_train_vids`` are the number of distinct train cameras /
    views, raised to ``max id + 1`` over all subsets when query or gallery use an id
    that train lacks (VehicleID's gallery camera), so SIE tables of that size can be
    indexed by every sample.
    """

    name: str = "dataset"
    #: the benchmark's published split statistics (:func:`check_published_statistics`); None: none
    published_stats: dict[str, SplitStats] | None = None

    def __init__(self) -> None:
        self.train: list[Sample] = []
        self.query: list[Sample] = []
        self.gallery: list[Sample] = []
        # camera number as written in the names -> camera id (empty: the convention 'number - 1')
        self.camera_numbers: dict[int, int] = {}
        self.train_pids: list[int] = []   # training identities before relabelling

    def set_train(self, samples: Sequence[Sample]) -> None:
        """``train`` = ``samples`` relabelled (:func:`relabel`); the original identities are kept
        in ``train_pids`` (to recognise training identities in a test split)."""
        self.train_pids = sorted({s[1] for s in samples})
        self.train = relabel(samples)

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def get_imagedata_info(data: Sequence[Sample]) -> tuple[int, int, int, int]:
        """(# ids, # images, # cameras, # views) of a subset."""
        pids = {s[1] for s in data}
        cams = {s[2] for s in data}
        views = {s[3] for s in data}
        return len(pids), len(data), len(cams), len(views)

    def _finalize(self, test_only: bool = False) -> None:
        """Validate the subsets, compute the counts, log the table. ``test_only``: no train
        subset (evaluation of a checkpoint); the camera/view counts then come from query+gallery."""
        for subset in ("query", "gallery") if test_only else ("train", "query", "gallery"):
            if not getattr(self, subset):
                where = getattr(self, "dataset_dir", "")
                raise DatasetError(f"{self.name}: the {subset} subset is empty"
                                 + (f" (dataset folder {where})" if where else ""))
        self.test_only = test_only
        everything = self.train + self.query + self.gallery
        if min(s[2] for s in everything) < 0 or min(s[3] for s in everything) < 0:
            raise DatasetError(f"{self.name}: negative camera or view id")
        (self.num_train_pids, self.num_train_imgs,
         self.num_train_cams, self.num_train_vids) = self.get_imagedata_info(self.train)
        self.num_train_cams = max(self.num_train_cams, 1 + max(s[2] for s in everything))
        self.num_train_vids = max(self.num_train_vids, 1 + max(s[3] for s in everything))
        (self.num_query_pids, self.num_query_imgs,
         self.num_query_cams, self.num_query_vids) = self.get_imagedata_info(self.query)
        (self.num_gallery_pids, self.num_gallery_imgs,
         self.num_gallery_cams, self.num_gallery_vids) = self.get_imagedata_info(self.gallery)
        self.log_statistics()

    def statistics_table(self) -> str:
        rows = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        lines = [f"=> {self.name} loaded",
                 "  subset   | # ids | # images | # cameras",
                 "  ---------+-------+----------+----------"]
        for label, data in rows:
            n_ids, n_imgs, n_cams, _ = self.get_imagedata_info(data)
            lines.append(f"  {label:<8} | {n_ids:5d} | {n_imgs:8d} | {n_cams:9d}")
        return "\n".join(lines)

    def log_statistics(self) -> None:
        logger.info("%s", self.statistics_table())

    def published_statistics(self) -> dict[str, SplitStats] | None:
        """The published statistics of each split, for the splits this dataset has (None: none)."""
        return self.published_stats


def check_published_statistics(dataset: BaseImageDataset, strict: bool = False) -> list[str]:
    """Compare the loaded splits with the benchmark's published statistics (identities, images,
    cameras); return the differences, e.g. ``gallery: 15912 images, published 15913``.

    A partly extracted or half-copied dataset still parses; this is what notices it. Differences
    are one warning naming the dataset folder, or with ``strict`` (DATASETS.STRICT_STATS) one
    :class:`DatasetError`. Datasets without published figures (``folder``, the synthetic set)
    are not checked; an evaluation without a training split checks query and gallery.
    """
    expected = dataset.published_statistics()
    if not expected:
        return []
    subsets = ("query", "gallery") if getattr(dataset, "test_only", False) else ("train", "query", "gallery")
    found = []
    for subset in subsets:
        have = dataset.get_imagedata_info(getattr(dataset, subset))[:3]
        found += [f"{subset}: {got} {what}, published {want}"
                  for what, want, got in zip(("identities", "images", "cameras"), expected[subset], have)
                  if want is not None and want != got]
    if found:
        where = getattr(dataset, "dataset_dir", "") or ""
        msg = (f"{dataset.name} in {where} differs from its published statistics: {'; '.join(found)}. A missing "
               "or half-copied part, or another version of the dataset, gives this")
        if strict:
            raise DatasetError(msg + " (DATASETS.STRICT_STATS True refuses it)")
        logger.warning("%s; DATASETS.STRICT_STATS True makes this an error", msg)
    return found

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={len(self.train)}, query={len(self.query)}, "
                f"gallery={len(self.gallery)}, ids={self.num_train_pids})")


def dataset_identity(dataset: BaseImageDataset, content: bool = False) -> dict[str, Any]:
    """What identifies a dataset wherever it lies: its name, a fingerprint of its query and gallery
    files (paths relative to the dataset folder, identities and cameras; not where the folder is),
    its camera numbering and its training identities. Stored in checkpoint metadata.

    ``content``: also ``'content'``, a digest of every image of the training, query and gallery
    lists (relative path, labels and bytes), which changes when the data is regenerated or an
    image replaced under the same name. It reads every file once (about 1 s for 36,000 small
    files from the page cache on a 2-core machine); training stores it to check ``--resume``.
    """
    base = getattr(dataset, "dataset_dir", "") or ""
    number_of = {i: n for n, i in dataset.camera_numbers.items()}   # the camera as written, not its id

    def lines(subsets: tuple[str, ...]) -> Iterable[tuple[str, str]]:
        for subset in subsets:
            for path, pid, cam, view in sorted(getattr(dataset, subset)):
                rel = os.path.relpath(path, base) if base else os.path.basename(path)
                yield path, f"{subset}\t{rel}\t{pid}\t{number_of.get(cam, cam)}\t{view}\n"
    h = hashlib.sha1()
    for _, line in lines(("query", "gallery")):
        h.update(line.encode())
    out = {"name": dataset.name, "fingerprint": h.hexdigest(),
           "camera_numbers": {str(n): int(i) for n, i in sorted(dataset.camera_numbers.items())},
           "num_cameras": int(getattr(dataset, "num_train_cams", 0)), "train_pids": list(dataset.train_pids)}
    if content:
        h = hashlib.sha1()
        for path, line in lines(("train", "query", "gallery")):
            h.update(line.encode())
            try:
                with open(path, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha1").digest())
            except OSError as e:
                raise DatasetError(f"{path} cannot be read ({e.strerror or e})") from None
        out["content"] = h.hexdigest()
    return out


def dataset_change(saved: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """How the data now (``current``) differs from the data a run began on (``saved``), both
    :func:`dataset_identity`: a short phrase such as "other query/gallery files", for the line that
    refuses or restarts a resumed run; empty when nothing differs or nothing was saved."""
    if not saved:
        return ""
    parts = []
    if saved.get("name") != current.get("name"):
        parts.append(f"dataset {saved.get('name')} -> {current.get('name')}")
    if saved.get("fingerprint") and saved["fingerprint"] != current.get("fingerprint"):
        parts.append("other query/gallery files")
    if "train_pids" in saved and list(saved["train_pids"]) != list(current.get("train_pids", [])):
        parts.append(f"other training identities ({len(saved['train_pids'])} -> "
                     f"{len(current.get('train_pids', []))})")
    if "camera_numbers" in saved and saved["camera_numbers"] != current.get("camera_numbers"):
        parts.append("other cameras")
    if saved.get("content") and current.get("content") and saved["content"] != current["content"]:
        parts.append("other image files or contents")
    return ", ".join(parts)


def renumber_cameras(dataset: BaseImageDataset, numbers: dict[int, int]) -> bool:
    """Give the query and gallery of ``dataset`` the camera ids of ``numbers`` (camera number as
    written -> id, e.g. a checkpoint's training numbering), when the dataset numbers the same
    cameras otherwise (a test-only folder without the training split: c3, c7, c9 -> 0, 1, 2 here
    but 1, 3, 4 in training). Only when every test camera number is in ``numbers``; returns
    whether anything changed."""
    own = dataset.camera_numbers
    if not own or not numbers or own.items() <= numbers.items():
        return False
    if any(n not in numbers for n in own):
        return False
    to_new = {i: numbers[n] for n, i in own.items()}
    for subset in ("query", "gallery"):
        setattr(dataset, subset, [(p, pid, to_new.get(c, c), v) for p, pid, c, v in getattr(dataset, subset)])
    dataset.camera_numbers = {n: numbers[n] for n in own}
    dataset.num_train_cams = max(dataset.num_train_cams, 1 + max(numbers.values()))
    return True


def train_test_overlap(train_pids: Iterable[int], dataset: BaseImageDataset) -> int:
    """How many identities of the query and gallery are training identities (``train_pids``):
    distractors (0) and junk (-1) are not identities. Non-zero means a leaked test split."""
    test = {s[1] for s in dataset.query} | {s[1] for s in dataset.gallery}
    return len((test - {0, -1}) & set(train_pids))


def require_dirs(name: str, base: str, subdirs: Iterable[str], layout: str | None) -> None:
    """Raise one :class:`DatasetLayoutError` naming every missing folder and the layout
    (``layout=None``: a one-line message, for evaluation that needs only query and gallery)."""
    missing = [os.path.join(base, d) for d in subdirs if not os.path.isdir(os.path.join(base, d))]
    if missing and layout is None:
        raise DatasetLayoutError(f"{name}: missing {', '.join(missing)} (evaluation needs the query and "
                                 f"gallery folders under DATASETS.ROOT_DIR)")
    if missing:
        shown = " | ".join(line.strip() for line in layout.strip().splitlines())
        raise DatasetLayoutError(f"{name}: missing {', '.join(missing)}; expected layout: {shown}")


def resolve_dataset_dir(root: str, dataset_dir: str, subdirs: Iterable[str]) -> str:
    """``<root>/<dataset_dir>``; ``root`` itself when it already is the dataset folder."""
    base = os.path.join(root, dataset_dir)
    subdirs = list(subdirs)
    if not os.path.isdir(base) and subdirs and all(
            os.path.isdir(os.path.join(root, d)) for d in subdirs):
        return root
    return base


def dataset_image_names(dir_path: str) -> list[str]:
    """Sorted image file names (not paths) in the flat dataset folder ``dir_path``.

    The benchmark layouts are flat; a folder holding per-identity sub-folders of images
    instead is refused with a message that says so.
    """
    images = list_images(dir_path)
    if not images:
        nested = [d for d in sorted(os.listdir(dir_path)) if os.path.isdir(os.path.join(dir_path, d))
                  and list_images(os.path.join(dir_path, d))]
        if nested:
            raise DatasetError(f"{dir_path} holds images in sub-folders ({nested[0]}/, ...) but the layout is "
                               "flat: put the images directly in the folder, named as the layout says")
    return images


def verify_images(paths: Sequence[str], what: str) -> None:
    """Open the header of every file (fast: no decoding) and raise one error naming the bad ones.

    Run before training, so that an unreadable query or gallery image is found before
    hours of training rather than at the final evaluation.
    """
    bad = []
    for p in paths:
        try:
            with Image.open(p):
                pass
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append(f"{p} ({type(e).__name__})")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError(f"{what}: {len(bad)} of {len(paths)} images cannot be opened: "
                           f"{', '.join(bad[:3])}{more}")


class ImageDataset(Dataset):
    """Torch dataset over samples; each item is a dict of tensors-to-be.

    Keys: ``img``, ``pid``, ``camid``, ``viewid``; ``path`` when ``with_path``;
    ``ssl_view1``/``ssl_view2`` when ``ssl_views`` (two more independent draws of ``transform``;
    one resize for the three when the transform has ``views(img, n)``, see
    :class:`datasets.transforms.TrainTransform`).

    ``device_transform`` is what the loader's batches need on the device (the loaders' images
    are uint8; :class:`datasets.device_transforms.DeviceTransform`): the consumer finds it here
    (``processor.batches.device_transform_of``). None: the items are final.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None,
                 ssl_views: bool = False, with_path: bool = False, read_retries: int = 3,
                 device_transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.ssl_views = ssl_views
        self.with_path = with_path
        self.read_retries = read_retries
        self.device_transform = device_transform

    def __len__(self) -> int:
        return len(self.samples)

    def _images(self, img: Any) -> list[Any]:
        n = 3 if self.ssl_views else 1
        if self.transform is None:
            return [img] * n
        if n > 1 and hasattr(self.transform, "views"):
            return self.transform.views(img, n)
        return [self.transform(img) for _ in range(n)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, pid, camid, viewid = self.samples[index]
        images = self._images(read_image(path, retries=self.read_retries))
        item: dict[str, Any] = {"img": images[0], "pid": pid, "camid": camid, "viewid": viewid}
        if self.ssl_views:
            item["ssl_view1"], item["ssl_view2"] = images[1], images[2]
        if self.with_path:
            item["path"] = path
        return item
