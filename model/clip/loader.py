"""Load CLIP weights from a local file; nothing is ever downloaded.

Accepted files: OpenAI's TorchScript archives (``ViT-B-16.pt``, ``RN50.pt``), plain state
dicts saved with ``torch.save``, and open_clip checkpoints (``{'state_dict': ...}``,
possibly with DDP ``module.`` prefixes). A bare model name is looked up where OpenAI's
``clip.load`` caches it: ``~/.cache/clip/<name>.pt``.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch

from .model import ARCHITECTURES, CLIP, build_model

__all__ = ["load_clip", "load_state_dict", "resolve_checkpoint", "CLIP_CACHE_DIR"]

CLIP_CACHE_DIR = Path("~/.cache/clip")
# OpenAI's file names for the architectures we know (``clip.load`` uses "ViT-B/16" -> "ViT-B-16.pt").
_OPENAI_FILE_NAMES = {"ViT-B-16": "ViT-B-16.pt", "ViT-B/16": "ViT-B-16.pt", "RN50": "RN50.pt"}


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """Map a file path or a model name to an existing file, or raise FileNotFoundError."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    if name in _OPENAI_FILE_NAMES or name in ARCHITECTURES:
        cached = (CLIP_CACHE_DIR / _OPENAI_FILE_NAMES.get(name, f"{name}.pt")).expanduser()
        if cached.is_file():
            return cached
        raise FileNotFoundError(
            f"CLIP weights for {name!r} not found at {cached}. Nothing is downloaded: put OpenAI's "
            f"{cached.name} there, or set MODEL.PRETRAIN_PATH to a local CLIP checkpoint "
            f"(OpenAI .pt archive, state dict or open_clip checkpoint).")
    raise FileNotFoundError(
        f"CLIP checkpoint {str(path)!r} does not exist. Set MODEL.PRETRAIN_PATH to a local CLIP "
        f"checkpoint, or use a model name {sorted(_OPENAI_FILE_NAMES)} with the OpenAI file in "
        f"{CLIP_CACHE_DIR}.")


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with compiled code and a constants table."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an OpenAI-format CLIP state dict (float tensors on CPU) from any accepted file."""
    path = Path(path)
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():  # TorchScript is deprecated, but OpenAI ships its weights so
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a CLIP state dict (got {type(state_dict).__name__})")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_clip(
    name_or_path: str | os.PathLike,
    h_resolution: int,
    w_resolution: int,
    vision_stride_size: int,
) -> CLIP:
    """Build CLIP from a local checkpoint (path or OpenAI model name), see ``build_model``."""
    return build_model(load_state_dict(resolve_checkpoint(name_or_path)), h_resolution, w_resolution,
                       vision_stride_size)
