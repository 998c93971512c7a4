"""Checkpoints: atomic writes, safe loads, and load errors that list what does not fit."""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import IO, Any

import torch
import torch.nn as nn

from .errors import UserError, brief
from .fileio import atomic_write


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be used: damaged, not a checkpoint, or not fitting the model."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys)."""


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or Inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside it (dicts, lists, tuples, nested) moved to the CPU, the
    containers rebuilt as their own type (a state dict keeps its ``_metadata``). Saved files then
    carry no device tags: a plain ``torch.load`` without ``map_location`` reads them on a machine
    without the GPU they were trained on, as the published loaders do."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = on_cpu(v)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata   # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


class _HashingWriter:
    """A write-only file object that passes every write on to ``f`` and hashes it (SHA-256)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        self._hash.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def save_atomic(obj: Any, path: str, check_finite: Mapping[str, Any] | None = None,
                before_rename: Callable[[str], None] | None = None) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``.

    Every tensor is saved on the CPU (:func:`on_cpu`). ``check_finite``: a state dict that must
    hold only finite values; otherwise nothing is written and a :class:`CheckpointError` names the
    first offending keys. ``before_rename(sha256)``: called with the SHA-256 of the bytes written,
    computed while writing, once the file is complete and before it appears at ``path`` (the
    weights' metadata is written there, naming the hash: neither file appears without the other).
    """
    if check_finite is not None:
        bad = non_finite_keys(check_finite)
        if bad:
            raise CheckpointError(f"refusing to write {path}: non-finite values in {len(bad)} tensor(s) "
                                  f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    obj = on_cpu(obj)

    def write(f: IO[bytes]) -> None:
        if before_rename is None:
            torch.save(obj, f)
            return
        hashing = _HashingWriter(f)
        torch.save(obj, hashing)
        before_rename(hashing.hexdigest())
    atomic_write(path, write)


def require_checkpoint_file(path: str) -> None:
    """Refuse a checkpoint path that is not a file: a missing one, or a folder (a run folder given
    for its weights), each in one line naming it."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: give the weights file in it "
                              "(e.g. its <MODEL.NAME>_<epoch>.pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")


def load_file(path: str, weights_only: bool = True) -> Any:
    """torch.load on the CPU; a missing, empty, damaged or unsafe file is one clear error naming it."""
    require_checkpoint_file(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        with warnings.catch_warnings():   # protocol notes of the safe unpickler: noise here
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError,
            UnicodeDecodeError, OSError) as e:   # OSError: torch's reader on a cut archive (errno 22)
        if isinstance(e, pickle.UnpicklingError) and _is_pickle_or_zip(path):
            raise CheckpointError(f"{path} holds objects other than tensors and plain containers; refused "
                                  "(loading them could run arbitrary code): not a checkpoint this code writes "
                                  "or reads") from None
        what = "not a pickle" if isinstance(e, pickle.UnpicklingError) else brief(e)
        if isinstance(e, OSError):
            what = f"cannot be read to the end: {what}"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is damaged/truncated ({what})") from None


def _is_pickle_or_zip(path: str) -> bool:
    """Whether ``path`` is a torch zip archive or a pickle (protocol 2+), i.e. a real but unsafe file."""
    with open(path, "rb") as f:
        return zipfile.is_zipfile(f) or f.seek(0) == 0 and f.read(1) == b"\x80"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return unwrap(model).state_dict()


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing missing / unexpected / mis-shaped keys (if any)."""
    own = unwrap(model).state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shaped = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shaped:
        def show(name: str, items: list[str]) -> str:
            head = ", ".join(items[:8]) + (f", ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            return f"{name} ({len(items)}): {head}" if items else ""
        parts = [p for p in (show("missing keys", missing), show("unexpected keys", unexpected),
                             show("mis-shaped keys", shaped)) if p]
        raise CheckpointMismatchError(f"{source} does not fit the model — " + "; ".join(parts))


def as_state_dict(obj: Any, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The model state dict held by a loaded checkpoint object: a plain state dict, a
    ``last.pth`` training state (``'model'``), a ``{'state_dict': ...}`` save, with or without
    DataParallel/DDP ``module.`` prefixes. Anything else is a :class:`CheckpointError`."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]          # a last.pth training state
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not (isinstance(obj, Mapping) and obj
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())):
        shown = list(obj)[:5] if isinstance(obj, Mapping) else ""
        raise CheckpointError(f"{source} does not hold a model state dict (got {type(obj).__name__} {shown})")
    return _strip_prefix(obj)


def load_model_weights(model: nn.Module, path_or_state: str | Mapping[str, torch.Tensor],
                       source: str = "state dict") -> None:
    """Load model weights (a checkpoint path, a full training state, or a state dict) strictly;
    ``source`` names an in-memory state in the errors (e.g. the file it was read from)."""
    if isinstance(path_or_state, str):
        source, sd = path_or_state, read_state_dict(path_or_state)
    else:
        sd = as_state_dict(path_or_state, source)
    check_state_dict(model, sd, source)
    unwrap(model).load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- released weights
def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model state dict in a weights file (see :func:`as_state_dict`), on the CPU."""
    return as_state_dict(load_file(path), path)


def metadata_path(weights_path: str) -> str:
    """``ViT-B-16_60.pth`` -> ``ViT-B-16_60.json``: the metadata file written beside a weights file."""
    return os.path.splitext(weights_path)[0] + ".json"


def write_metadata(weights_path: str, meta: Mapping[str, Any]) -> str:
    """Write the metadata of a weights file beside it (atomically); returns its path."""
    from utils.misc import write_json_atomic
    path = metadata_path(weights_path)
    write_json_atomic(path, dict(meta))
    return path


def read_metadata(weights_path: str) -> dict[str, Any] | None:
    """The metadata beside a weights file, or None when there is none (e.g. published weights).

    It must be the metadata of these weights: its values of the types written
    (:func:`check_metadata_types`), and its SHA-256 of the weights file equal to the file's.
    Metadata written before the hash was stored is used with one warning. A mismatch is a
    :class:`CheckpointMismatchError` naming the file and the key.
    """
    import json
    path = metadata_path(weights_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(f"checkpoint metadata {path} is unreadable ({e}); "
                                      f"move it away to size the model from the tensors alone") from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        return None                # some other JSON that happens to share the name
    check_metadata_types(meta, path)
    saved = meta.get(WEIGHTS_HASH_KEY)
    if saved is None:
        if path not in _UNHASHED_WARNED:
            _UNHASHED_WARNED.add(path)
            logging.getLogger("svllreid").warning(
                "checkpoint metadata %s holds no %s (written by an older version): it is used without a check "
                "that it belongs to %s", path, WEIGHTS_HASH_KEY, weights_path)
    elif os.path.isfile(weights_path) and file_sha256(weights_path) != saved:
        raise CheckpointMismatchError(
            f"checkpoint metadata {path} belongs to other weights than {weights_path} (its {WEIGHTS_HASH_KEY} "
            f"{saved[:12]}... is not the file's {file_sha256(weights_path)[:12]}...): put the metadata file of "
            "these weights beside them, or move it away to size the model from the tensors alone")
    return meta


METADATA_FORMAT = "svllreid-weights-metadata"
WEIGHTS_HASH_KEY = "weights_sha256"     # the metadata's SHA-256 of the weights file it describes
_UNHASHED_WARNED: set[str] = set()

# What the metadata's values must be: (test, what is expected); keys in REQUIRED_METADATA must be present.
_POSITIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
_OPTIONAL_INT = (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")
_OPTIONAL_STR = (lambda v: v is None or isinstance(v, str), "a string or null")
_OPTIONAL_DICT = (lambda v: v is None or isinstance(v, dict), "a mapping or null")
METADATA_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_classes": _POSITIVE_INT, "camera_num": _POSITIVE_INT, "view_num": _POSITIVE_INT, "feat_dim": _POSITIVE_INT,
    "sie_camera": _BOOL, "sie_view": _BOOL,
    "sie_coe": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "model": _STR, "dataset": _STR, "dataset_root": _OPTIONAL_STR, "commit": _OPTIONAL_STR,
    "stage": _OPTIONAL_INT, "epoch": _OPTIONAL_INT, "version": _OPTIONAL_INT,
    "config": _OPTIONAL_DICT, "dataset_identity": _OPTIONAL_DICT,
    WEIGHTS_HASH_KEY: (lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
                       "the 64 hex digits of a SHA-256"),
}
REQUIRED_METADATA = ("dataset", "camera_num", "view_num", "sie_camera", "sie_view")


def check_metadata_types(meta: Mapping[str, Any], path: str) -> None:
    """Refuse metadata whose values are not of the types this code writes (a hand edit such as
    ``camera_num: "two"``), or that lacks a key evaluation needs: one :class:`CheckpointMismatchError`
    naming the file, the key, the value and what was expected."""
    def refuse(key: str, value: Any, expected: str) -> None:
        raise CheckpointMismatchError(f"checkpoint metadata {path}: {key} is {value!r}, expected {expected}; put "
                                      "back the file the training wrote, or move it away to size the model from "
                                      "the tensors alone")
    for key in REQUIRED_METADATA:
        if key not in meta:
            refuse(key, "missing", METADATA_TYPES[key][1])
    for key, (ok, expected) in METADATA_TYPES.items():
        if key in meta and not ok(meta[key]):
            refuse(key, meta[key], expected)
    numbers = (meta.get("dataset_identity") or {}).get("camera_numbers")
    if numbers is not None:
        if not isinstance(numbers, dict):
            refuse("dataset_identity.camera_numbers", numbers, "a mapping of camera number -> camera id")
        for n, i in numbers.items():
            if not (str(n).lstrip("-").isdigit() and isinstance(i, int) and not isinstance(i, bool)):
                refuse(f"dataset_identity.camera_numbers[{n!r}]", i, "integer camera numbers mapped to integer ids")


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """The sha256 (hex) of a file, such as a checkpoint: what identifies the weights behind features
    wherever the file is moved. Remembered per (path, size, mtime) within the process."""
    import hashlib
    full = os.path.abspath(path)
    st = os.stat(full)
    key = (full, st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        with open(full, "rb") as f:
            _SHA256[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[key]
