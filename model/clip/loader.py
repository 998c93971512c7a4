"""Load CLIP weights from a file, or OpenAI's file for a model name (downloaded on first use).

Accepted files, all mapped to OpenAI's parameter names:

* OpenAI's TorchScript archives (``ViT-B-16.pt``, ``RN50.pt``) and plain state dicts with
  OpenAI's names, saved with ``torch.save``;
* open_clip checkpoints: a plain state dict or ``.safetensors`` file, a training checkpoint
  (``{'state_dict': ...}``), ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes,
  and the ``text.`` text tower of its ``CustomTextCLIP``;
* Hugging Face ``transformers`` CLIP checkpoints (``CLIPModel``: ``pytorch_model.bin`` or
  ``model.safetensors``; ViT only): the q/k/v projections joined, the two projection
  matrices transposed, every other name renamed.

Anything else is refused in one line naming what the file holds. A bare model name
(``ViT-B-16``, ``RN50``) means OpenAI's file where OpenAI's ``clip.load`` caches it,
``~/.cache/clip/<name>.pt``, downloaded there on first use (:mod:`.download`).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError

from .download import OPENAI_URLS, fetch_openai_weights, hand_copy_hint
from .model import ARCHITECTURES, CLIP, build_model

__all__ = ["load_clip", "load_state_dict", "resolve_checkpoint", "CLIP_CACHE_DIR"]

logger = logging.getLogger("svllreid.clip")

CLIP_CACHE_DIR = Path("~/.cache/clip")
# OpenAI's file names for the architectures we know (``clip.load`` uses "ViT-B/16" -> "ViT-B-16.pt").
_OPENAI_FILE_NAMES = {"ViT-B-16": "ViT-B-16.pt", "ViT-B/16": "ViT-B-16.pt", "RN50": "RN50.pt"}
# Keys that every OpenAI-named CLIP state dict has.
_REQUIRED = ("visual.conv1.weight", "token_embedding.weight")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")     # DDP / DataParallel, torch.compile

# Hugging Face transformers CLIPModel -> OpenAI names.
_HF_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",     # (sic: transformers' name)
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_HF_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_HF_SKIPPED = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
_HF_LAYER = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)")
_HF_BLOCK = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
             "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def resolve_checkpoint(name_or_path: str | os.PathLike, download: bool = True) -> Path:
    """Map a file path or a model name to an existing file.

    A name (``ViT-B-16``, ``RN50``) is OpenAI's file in :data:`CLIP_CACHE_DIR`, fetched and
    verified there when ``download`` is true (:func:`.download.fetch_openai_weights`); a
    missing file is ``FileNotFoundError`` saying where to get it.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    if name in _OPENAI_FILE_NAMES or name in ARCHITECTURES:
        file_name = _OPENAI_FILE_NAMES.get(name, f"{name}.pt")
        cached = (CLIP_CACHE_DIR / file_name).expanduser()
        arch = file_name.removesuffix(".pt")
        if download and arch in OPENAI_URLS:
            return fetch_openai_weights(arch, cached)
        if cached.is_file():
            return cached
        where = hand_copy_hint(OPENAI_URLS[arch], cached) if arch in OPENAI_URLS else f"put OpenAI's file at {cached}"
        raise FileNotFoundError(f"CLIP weights for {name!r} not found at {cached}, and nothing is downloaded when "
                                f"MODEL.PRETRAIN_PATH names them; {where}")
    raise FileNotFoundError(
        f"CLIP checkpoint {str(path)!r} does not exist. Set MODEL.PRETRAIN_PATH to a local CLIP "
        f"checkpoint, or leave it empty to use OpenAI's weights for MODEL.NAME {sorted(ARCHITECTURES)} "
        f"(downloaded on first use into {CLIP_CACHE_DIR}).")


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with compiled code and a constants table."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read(path: Path) -> Any:
    """What the file holds: a TorchScript archive's state dict, a safetensors dict or ``torch.load``'s
    object (tensors only); a file none of them reads is one line."""
    try:
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():  # TorchScript is deprecated, but OpenAI ships its weights so
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        if _is_safetensors(path):
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the readers raise on a foreign file becomes one line
        if type(e).__name__ == "UnpicklingError":
            why = ("it holds pickled Python objects besides tensors, which are not loaded for safety "
                   "(save the model's state_dict() instead)")
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"no TorchScript, safetensors or torch.save reader takes it ({type(e).__name__}: {first})"
        raise UserError(f"CLIP checkpoint {path} cannot be read: {why}") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict with OpenAI's names from any accepted file (see the module docstring)."""
    path = Path(path)
    found = _read(path)
    if isinstance(found, dict) and isinstance(found.get("state_dict"), dict):
        found = found["state_dict"]            # an open_clip training checkpoint
    if not isinstance(found, dict) or not found:
        what = "an empty dict" if isinstance(found, dict) else f"a {type(found).__name__}"
        raise UserError(f"CLIP checkpoint {path} holds {what}, not a state dict")
    state_dict = dict(found)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped = True
    if any(str(k).startswith(("text_model.", "vision_model.")) for k in state_dict):
        logger.info("%s: Hugging Face transformers CLIP names, mapped to OpenAI's", path)
        state_dict = _from_hugging_face(state_dict)
    elif any(str(k).startswith("text.") for k in state_dict):
        logger.info("%s: open_clip CustomTextCLIP names (text tower under 'text.'), mapped to OpenAI's", path)
        state_dict = {k.removeprefix("text."): v for k, v in state_dict.items()}
    if not all(k in state_dict for k in _REQUIRED):
        keys = [str(k) for k in state_dict]
        raise UserError(f"CLIP checkpoint {path} has neither OpenAI/open_clip nor Hugging Face CLIP names (no "
                        f"{' / '.join(_REQUIRED)}): it holds {len(keys)} entries, the first: {', '.join(keys[:5])}")
    return state_dict


def _from_hugging_face(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict under OpenAI's names. Keys it does not know are kept as
    found, so that :func:`build_model` names them; an incomplete q/k/v triple leaves ``in_proj`` missing."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in _HF_SKIPPED:
            continue
        if key in _HF_NAMES:
            out[_HF_NAMES[key]] = value
            continue
        if key in _HF_TRANSPOSED:               # nn.Linear (out, in) -> OpenAI's (in, out) matrix
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        layer = _HF_LAYER.fullmatch(key)
        if layer is None:
            out[key] = value
            continue
        block = f"{'visual.' if layer[1] == 'vision' else ''}transformer.resblocks.{layer[2]}."
        rest = layer[3]
        part = _HF_QKV.fullmatch(rest)
        if part:
            qkv.setdefault((block, part[2]), {})[part[1]] = value
            continue
        hf = next((h for h in _HF_BLOCK if rest.startswith(h)), None)
        out[block + _HF_BLOCK[hf] + rest[len(hf):] if hf else key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:       # nn.MultiheadAttention packs them as [q; k; v]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def load_clip(
    name_or_path: str | os.PathLike,
    h_resolution: int,
    w_resolution: int,
    vision_stride_size: int,
    download: bool = True,
) -> CLIP:
    """Build CLIP from a checkpoint file or an OpenAI model name (see :func:`resolve_checkpoint`
    and ``build_model``); a state dict that does not fit the architecture is one ``UserError`` line."""
    path = resolve_checkpoint(name_or_path, download)
    state_dict = load_state_dict(path)
    try:
        return build_model(state_dict, h_resolution, w_resolution, vision_stride_size)
    except ValueError as e:
        raise UserError(f"CLIP checkpoint {path}: {' '.join(str(e).split())}") from None
