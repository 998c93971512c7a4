"""Using a trained model outside the benchmark: load it, encode any folder, save the features.

Shared by ``tools/extract_features.py``, ``tools/search.py`` and ``tools/build_index.py``; they
compare features by the project's one distance rule (``utils.distance.DistanceSpec``). Features
are computed exactly as the evaluation computes them:
the test transform (``datasets.transforms.build_loader_transform(cfg, is_train=False)`` in the
workers, ``DeviceTransform`` on the device), eval mode, the same autocast, the camera label
for side information when it is known.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from config import ConfigError
from datasets.device_transforms import DeviceTransform
from datasets.market1501 import parse_market_name
from datasets.transforms import build_loader_transform
from model import load_for_inference, move_model
from model.loading import camera_numbers
from processor.amp import autocast
from processor.batches import to_device
from processor.progress import progress
from utils.checkpoint import file_sha256
from utils.fileio import atomic_write, open_npz_array
from utils.images import INPUT_EXTENSIONS, read_image, scan_images
from utils.misc import resolve_num_workers
from utils.run_dir import LOCK_FILE

logger = logging.getLogger("svllreid")

# ----------------------------------------------------------------------------- model
def load_model(cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``cfg.TEST.WEIGHT`` loaded as evaluation loads it (``model.load_for_inference``).

    Whether the camera table is used is the evaluation's decision (``model.decide_use_sie``
    without a test set: the config names the checkpoint's training dataset). Image folders
    carry camera numbers in their names (or ``--camera``) but no view labels, so a used camera
    x view table is refused. In the returned ``info`` (see ``load_for_inference``),
    'sie_camera' is whether camera labels are used for the features here, and
    'camera_numbers' maps a camera number as written to its SIE row (the checkpoint's training
    numbering; empty: number - 1).
    """
    model, info = load_for_inference(cfg)
    use = bool(info["use_sie"]) and bool(info["sie_camera"])
    if use and info["sie_view"]:
        raise ConfigError(f"{info['weight']}: camera x view side information needs view labels, which image "
                          "folders do not have; evaluate it with test_svllreid.py")
    model.sie_at_test = use
    info["sie_camera"] = use
    info["camera_numbers"] = camera_numbers(info["metadata"])
    return model, info


# ----------------------------------------------------------------------------- names and folders
def camera_row(number: int, numbers: dict[int, int] | None = None) -> int:
    """The camera id (SIE row) of camera number ``number`` as written in a name (``c3`` -> 3):
    from ``numbers`` (the checkpoint's training numbering, as the datasets number cameras) when
    given, else ``number - 1`` (``c0`` unknown). -1 = unknown."""
    if numbers:
        return int(numbers.get(number, -1))
    return number - 1 if number >= 1 else -1


def camera_number(row: int, numbers: dict[int, int] | None = None) -> int | None:
    """The camera number as written of camera id ``row`` (inverse of :func:`camera_row`); None if unknown."""
    if row < 0:
        return None
    if numbers:
        return next((n for n, i in numbers.items() if i == row), None)
    return row + 1


def parse_name(name: str, numbers: dict[int, int] | None = None) -> tuple[int, int]:
    """(pid, camera id) of a Market/VeRi-style file name (camera ``cN`` -> :func:`camera_row`),
    else (-1, -1)."""
    parsed = parse_market_name(os.path.basename(name))
    if parsed is None or (not numbers and parsed[1] == 0):    # no name, or c0 without a numbering
        return -1, -1
    return parsed[0], camera_row(parsed[1], numbers)


def tool_output(folder: str) -> str | None:
    """Why ``folder`` is this project's output rather than images (it holds a run's lock file: a
    search's --out with its ranked/ pictures, a training run, an evaluation folder), else None."""
    if os.path.isfile(os.path.join(folder, LOCK_FILE)):
        return f"the output of this project's tools (it holds {LOCK_FILE})"
    return None


def list_image_files(root: str, exclude: Sequence[str] = ()) -> list[str]:
    """Paths relative to ``root`` of every image file under it, recursively, sorted.

    Linked sub-folders are followed (loops and repeats are passed over); entries that are not
    regular files (a named pipe would hang the reading), the folders ``exclude`` (e.g. the
    output folder of the tool that lists) and folders the tools wrote (:func:`tool_output`) are
    left out, with one log line saying what was left out.
    """
    if not os.path.exists(root):
        raise FileNotFoundError(f"no such folder: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"not a folder: {root}")
    excluded = {os.path.realpath(p) for p in exclude}

    def skip(folder: str) -> str | None:
        return "this command's output folder" if os.path.realpath(folder) in excluded else tool_output(folder)
    out, skipped = scan_images(root, INPUT_EXTENSIONS, skip)
    ours = [(p, why) for p, why in skipped if why == skip(os.path.join(root, p))]
    for entries, log in ((ours, logger.info), ([x for x in skipped if x not in ours], logger.warning)):
        if entries:
            shown = "; ".join(f"{p} ({why})" for p, why in entries[:5]) + (" ..." if len(entries) > 5 else "")
            log("%s: %d entr%s left out: %s", root, len(entries), "y" if len(entries) == 1 else "ies", shown)
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(INPUT_EXTENSIONS)}) under {root}")
    return out


class _Files(Dataset):
    """Test-transformed uint8 images (``device_transform`` finishes them on the device); an
    unreadable file gives ``img=None`` and the error."""

    def __init__(self, paths: Sequence[str], transform: Any, retries: int,
                 device_transform: DeviceTransform | None = None) -> None:
        self.paths, self.transform, self.retries = list(paths), transform, retries
        self.device_transform = device_transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"i": i, "img": self.transform(read_image(self.paths[i], retries=self.retries)), "error": ""}
        except (OSError, ValueError) as e:
            return {"i": i, "img": None, "error": str(e)}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [x for x in items if x["img"] is not None]
    return {"i": torch.tensor([x["i"] for x in ok], dtype=torch.long),
            "img": torch.stack([x["img"] for x in ok]) if ok else None,
            "failed": [(x["i"], x["error"]) for x in items if x["img"] is None]}


@dataclass
class FeatureSet:
    """Features of the readable images of a folder, with labels parsed from the names (-1 = unknown)."""

    features: np.ndarray                 # (N, D) float32, as the evaluation computes them (not normalised)
    paths: list[str]                     # relative to ``root``
    pids: np.ndarray                     # (N,) int64
    camids: np.ndarray                   # (N,) int64, the camera label used (or -1)
    root: str = ""
    failed: list[tuple[str, str]] = field(default_factory=list)   # (relative path, reason)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str) -> None:
        """Atomically write a ``.npz`` (features, paths, pids, camids, failed, root, meta as JSON)."""
        arrays = dict(features=self.features.astype(np.float32), paths=np.array(self.paths, dtype=str),
                      pids=self.pids.astype(np.int64), camids=self.camids.astype(np.int64),
                      failed=np.array([p for p, _ in self.failed], dtype=str),
                      failed_reasons=np.array([r for _, r in self.failed], dtype=str),
                      root=np.array(self.root), meta=np.array(json.dumps(self.meta)))
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str, allow_empty: bool = False, mmap: bool = False) -> FeatureSet:
        """Read a file written by :meth:`save` (clear errors for anything else). A file of no
        features is refused unless ``allow_empty`` (a part of a sharded extraction may hold none).
        ``mmap``: the features stay on disk, memory-mapped read-only in their stored dtype (for
        galleries larger than memory; ``np.savez`` stores them uncompressed), not read as float32."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such feature file: {path}")
        not_ours = f"{path} is not a feature file (.npz written by tools/extract_features.py), or it was cut short"
        try:
            z = np.load(path, allow_pickle=False)
            if not hasattr(z, "files"):
                raise ValueError("a single array")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            raise ConfigError(not_ours) from None
        missing = [k for k in ("features", "paths") if k not in z.files]
        if missing:
            raise ConfigError(f"{path} has no {' / '.join(missing)}: write it with tools/extract_features.py")
        again = "write it again with tools/extract_features.py"
        try:
            feats, paths = open_npz_array(path, "features") if mmap else z["features"], z["paths"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
            raise ConfigError(not_ours) from None
        if feats.ndim != 2 or paths.ndim != 1 or feats.shape[0] != len(paths):
            raise ConfigError(f"{path}: features {feats.shape} do not match {len(paths)} paths")
        if not np.issubdtype(feats.dtype, np.number):
            raise ConfigError(f"{path}: features are {feats.dtype}, not numbers; {again}")
        n = feats.shape[0]
        if n == 0 and not allow_empty:
            raise ConfigError(f"{path} holds no features (0 images): nothing to search; {again} from a folder "
                              "with images")

        def labels(k: str) -> np.ndarray:
            if k not in z.files:
                return np.full(n, -1, dtype=np.int64)
            a = z[k]
            if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
                raise ConfigError(f"{path}: '{k}' is {a.dtype} {a.shape}, expected one integer per feature ({n},); "
                                  f"{again}")
            return a.astype(np.int64)
        failed: list[tuple[str, str]] = []
        if "failed" in z.files:
            names = z["failed"]
            reasons = z["failed_reasons"] if "failed_reasons" in z.files else np.array([], dtype=str)
            if names.ndim != 1 or reasons.shape != names.shape:
                raise ConfigError(f"{path}: 'failed' ({names.shape}) and 'failed_reasons' ({reasons.shape}) "
                                  f"differ in length; {again}")
            failed = list(zip(names.tolist(), reasons.tolist()))
        meta: dict[str, Any] = {}
        if "meta" in z.files:
            try:
                meta = json.loads(str(z["meta"]))
            except ValueError as e:
                raise ConfigError(f"{path}: 'meta' is not valid JSON ({e}); {again}") from None
            if not isinstance(meta, dict):
                raise ConfigError(f"{path}: 'meta' is JSON {type(meta).__name__}, expected an object; {again}")
        if "root" in z.files and z["root"].shape != ():
            raise ConfigError(f"{path}: 'root' is {z['root'].shape}, expected one folder name; {again}")
        root = str(z["root"]) if "root" in z.files else ""
        return cls(feats if mmap else feats.astype(np.float32), [str(p) for p in paths], labels("pids"),
                   labels("camids"), root, failed, meta)


# ----------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_batch(model: nn.Module, info: dict[str, Any], imgs: torch.Tensor, camids: torch.Tensor) -> torch.Tensor:
    """The evaluation features of a batch; a camera label is used where known (>= 0) and SIE is trained."""
    device = imgs.device
    if not info["sie_camera"]:
        with autocast(device):
            return model.retrieval_features(imgs).float()
    known = camids >= 0
    out = torch.empty((imgs.shape[0], info["feat_dim"]), dtype=torch.float32, device=device)
    with autocast(device):
        if bool(known.any()):
            out[known] = model.retrieval_features(imgs[known], cam_label=camids[known].to(device)).float()
        if not bool(known.all()):    # no label: the embedding is left out (retrieval_features warns once)
            out[~known] = model.retrieval_features(imgs[~known]).float()
    return out


def input_meta(cfg: Any) -> dict[str, Any]:
    """The part of :func:`feature_meta` known from the config and the checkpoint file alone, before
    the model is loaded: the checkpoint (path, sha256), TEST.FEAT_NORM, TEST.NECK_FEAT, INPUT.SIZE_TEST."""
    return {"weight": os.path.abspath(cfg.TEST.WEIGHT), "sha256": file_sha256(cfg.TEST.WEIGHT),
            "feat_norm": str(cfg.TEST.FEAT_NORM), "neck_feat": str(cfg.TEST.NECK_FEAT),
            "size_test": list(cfg.INPUT.SIZE_TEST)}


def feature_meta(cfg: Any, info: dict[str, Any], camera: int | None) -> dict[str, Any]:
    """What the features of :func:`extract_folder` depend on besides the images (the file's
    ``meta``): known before any image is encoded, so that a finished part can be checked. ``info``
    is that of :func:`load_model` for the config's TEST.WEIGHT."""
    numbers = info.get("camera_numbers") or {}
    return {**input_meta(cfg), "model_name": str(info.get("model_name") or cfg.MODEL.NAME),
            "feat_dim": int(info["feat_dim"]), "sie_camera": info["sie_camera"], "camera": camera,
            "camera_numbers": {str(n): i for n, i in sorted(numbers.items())}}


def extract_folder(cfg: Any, model: nn.Module, info: dict[str, Any], root: str, device: torch.device,
                   camera: int | None = None, files: Sequence[str] | None = None, allow_empty: bool = False,
                   report: Callable[[int, int], None] | None = None) -> FeatureSet:
    """Features of every image under ``root`` (or of ``files``, relative to it) in sorted order.

    ``camera`` (0-based id) is the label of images whose name does not give one. Unreadable
    files are skipped and listed in ``failed``. Batched (TEST.IMS_PER_BATCH) with a progress bar;
    ``report(done, total)`` is called after every batch. No readable image is an error unless
    ``allow_empty`` (a shard of a sharded extraction: it gives 0 rows). On a GPU each batch's
    features go to pinned host memory without a wait (one synchronisation at the end), so the
    device never idles while a batch is copied.
    """
    rel = list(files) if files is not None else list_image_files(root)
    numbers = info.get("camera_numbers") or {}
    labels = [parse_name(p, numbers) for p in rel]
    parsed = [parse_market_name(os.path.basename(p)) for p in rel]
    named = np.array([x is not None and (bool(numbers) or x[1] > 0) for x in parsed], dtype=bool)  # a camera to map
    cams = np.array([c if c >= 0 or n else (-1 if camera is None else camera) for (_, c), n in zip(labels, named)],
                    dtype=np.int64)
    if info["sie_camera"]:
        bad = named & ((cams < 0) | (cams >= info["camera_num"]))
        if bad.any():
            first = rel[int(np.flatnonzero(bad)[0])]
            known = ", ".join(f"c{n}" for n in sorted(numbers)) if numbers else f"c1..c{info['camera_num']}"
            logger.warning("%d image(s) have a camera beyond the model's %d trained cameras (%s; e.g. %s): no camera "
                           "label for them", int(bad.sum()), info["camera_num"], known, first)
            cams[bad] = -1
        unlabelled = (cams < 0) & ~bad
        if unlabelled.any():
            logger.warning("%d image(s) have no camera label (name not PPPP_cC..., no --camera) but the model has "
                           "trained camera side information (SIE): their features are computed without it and "
                           "are less comparable", int(unlabelled.sum()))
    prepare = DeviceTransform.from_cfg(cfg, is_train=False)
    ds = _Files([os.path.join(root, p) for p in rel], build_loader_transform(cfg, is_train=False),
                int(cfg.DATALOADER.READ_RETRIES), prepare)
    workers = resolve_num_workers(cfg.DATALOADER.NUM_WORKERS)
    loader = DataLoader(ds, batch_size=int(cfg.TEST.IMS_PER_BATCH), shuffle=False, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    model = move_model(model, device).eval()
    feats, kept, failed = [], [], []
    done = 0
    for batch in progress(loader, len(loader), f"extracting features ({len(rel)} images)"):
        failed += [(rel[i], err) for i, err in batch["failed"]]
        done += len(batch["failed"])
        if batch["img"] is not None:
            idx = batch["i"]
            imgs = to_device({"img": batch["img"]}, device, prepare)["img"]
            out = encode_batch(model, info, imgs, torch.from_numpy(cams[idx.numpy()]))
            # to the host without waiting (pinned memory): the next batch is not held up by this copy
            feats.append(out.to("cpu", non_blocking=True) if out.is_cuda else out)
            kept += idx.tolist()
            done += len(idx)
        if report is not None:
            report(done, len(rel))
    if device.type == "cuda":
        torch.cuda.synchronize(device)          # every copy to the host has landed
    if not kept and not allow_empty:
        raise OSError(f"none of the {len(rel)} images under {root} could be read; first: {failed[0][1]}")
    feat = (torch.cat(feats).numpy() if feats else np.zeros((0, int(info["feat_dim"])))).astype(np.float32)
    kept_a = np.array(kept, dtype=np.int64)
    meta = feature_meta(cfg, info, camera)
    meta["feat_dim"] = int(feat.shape[1])
    return FeatureSet(feat, [rel[i] for i in kept], np.array([labels[i][0] for i in kept], dtype=np.int64),
                      cams[kept_a], os.path.abspath(root), failed, meta)


def feature_signature(cfg: Any, root: str, files: Sequence[str], camera: int | None) -> str:
    """A hash of what the features of a folder depend on (checkpoint, test input, files) for caching."""
    w = os.path.abspath(cfg.TEST.WEIGHT)
    st = os.stat(w)
    parts = [w, st.st_size, st.st_mtime_ns, list(cfg.INPUT.SIZE_TEST), list(cfg.INPUT.PIXEL_MEAN),
             list(cfg.INPUT.PIXEL_STD), cfg.TEST.NECK_FEAT, cfg.MODEL.NAME, bool(cfg.MODEL.SIE_CAMERA),
             cfg.MODEL.SIE_COE, camera, os.path.abspath(root)]
    for p in files:
        s = os.stat(os.path.join(root, p))
        parts.append((p, s.st_size, s.st_mtime_ns))
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()
