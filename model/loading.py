"""Evaluation from a weights file alone: size the model from the checkpoint, load it, decide SIE.

Accepted files: weights written by our training (plus the metadata JSON beside them), the
published SVLL-ReID and CLIP-ReID checkpoints (same key names), ``last.pth`` training
states, and DataParallel/DDP saves (``module.`` prefix). The CLIP towers come from the
checkpoint, so no CLIP weights file is read.

Keys split in two groups:

- retrieval path (``image_encoder.*``, ``bottleneck*``, ``cv_embed``): every one must be
  present with the right shape, else :class:`CheckpointMismatchError` names them;
- training only (text side ``prompt_learner.*``/``text_encoder.*``, SSL heads
  ``image_mlp.*``/``text_mlp.*``, classifiers): may be absent or not fit; the part is then
  left out of the inference model (classifiers: random init) and one log line says so.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from config import ConfigError
from utils.checkpoint import (
    METADATA_FORMAT,
    CheckpointMismatchError,
    check_metadata_types,
    metadata_path,
    read_metadata,
    read_state_dict,
)

from . import clip
from .make_model import SVLLReID, SVLLReIDOptions, feature_grid, model_options_from_cfg

logger = logging.getLogger("svllreid")

__all__ = ["load_for_inference", "load_state_for_inference", "input_grid", "checkpoint_metadata", "decide_use_sie",
           "check_metadata", "camera_numbers",
           "RETRIEVAL_PREFIXES", "TRAINING_ONLY_PARTS"]

RETRIEVAL_PREFIXES = ("image_encoder.", "bottleneck.", "bottleneck_proj.", "cv_embed")
TRAINING_ONLY_PARTS: dict[str, tuple[str, ...]] = {
    "text side (prompts, text encoder)": ("prompt_learner.", "text_encoder."),
    "image SSL head": ("image_mlp.",),
    "text SSL head": ("text_mlp.",),
    "classifiers": ("classifier.", "classifier_proj."),
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- metadata
@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout (looked up once per process)."""
    try:
        out = subprocess.run(["git", "-C", _REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    import yaml
    return yaml.safe_load(cfg.dump())


def checkpoint_metadata(cfg: Any, model: nn.Module, stage: int | None, epoch: int | None) -> dict[str, Any]:
    """What a weights file cannot say by itself: the run's config, dataset, sizes, epoch, commit."""
    net: SVLLReID = model.module if hasattr(model, "module") else model
    return {
        "format": METADATA_FORMAT, "version": 1,
        "model": cfg.MODEL.NAME, "dataset": cfg.DATASETS.NAMES,
        "dataset_root": os.path.abspath(os.path.expanduser(cfg.DATASETS.ROOT_DIR)),
        "num_classes": int(net.num_classes), "camera_num": int(net.camera_num), "view_num": int(net.view_num),
        "sie_camera": bool(net.sie_camera), "sie_view": bool(net.sie_view), "sie_coe": float(net.sie_coe),
        "feat_dim": int(net.feat_dim), "stage": stage, "epoch": epoch, "commit": _git_commit(),
        "config": _cfg_dict(cfg),
        # name, query/gallery fingerprint, camera number -> SIE row, training identities (datasets.dataset_identity)
        "dataset_identity": getattr(net, "data_identity", None),
    }


# ----------------------------------------------------------------------------- sizing
def _arch_from_checkpoint(sd: Mapping[str, torch.Tensor], text_heads: int, with_text: bool) -> clip.CLIPArch:
    """CLIP architecture of the towers held by an SVLL-ReID / CLIP-ReID state dict."""
    width, layers, patch, vision_heads = clip.vision_tower_arch(sd, "image_encoder.")
    if patch:   # ViT
        embed = sd["image_encoder.proj"].shape[1] if "image_encoder.proj" in sd else 512
    else:
        embed = sd["image_encoder.attnpool.c_proj.weight"].shape[0] if "image_encoder.attnpool.c_proj.weight" in sd \
            else 1024
    if with_text:
        text_width = sd["text_encoder.ln_final.weight"].shape[0]
        text_layers = clip.count_blocks(sd, "text_encoder.transformer.resblocks.")
        context = sd["text_encoder.positional_embedding"].shape[0] if "text_encoder.positional_embedding" in sd else 77
    else:    # no text side: a one-layer placeholder that is never materialised
        text_width, text_layers, context = 64, 1, 77
    return clip.CLIPArch(embed_dim=int(embed), vision_layers=layers, vision_width=int(width),
                         vision_patch_size=int(patch), vision_heads=vision_heads, text_width=int(text_width),
                         text_heads=text_heads or max(1, text_width // 64), text_layers=text_layers,
                         context_length=int(context))


def _sie_sizes(sd: Mapping[str, torch.Tensor], meta: dict | None, cfg: Any, is_vit: bool,
               test_dataset: Any, notes: list[str]) -> tuple[bool, bool, int, int, float]:
    """(sie_camera, sie_view, camera_num, view_num, sie_coe) of the checkpoint's model."""
    rows = int(sd["cv_embed"].shape[0]) if "cv_embed" in sd and is_vit else 0
    if meta is not None:
        return (bool(meta["sie_camera"]), bool(meta["sie_view"]), int(meta["camera_num"]),
                int(meta["view_num"]), float(meta.get("sie_coe", cfg.MODEL.SIE_COE)))
    cam, view = bool(cfg.MODEL.SIE_CAMERA), bool(cfg.MODEL.SIE_VIEW)
    if not rows:
        if (cam or view) and is_vit:
            notes.append("the checkpoint has no SIE table (cv_embed): MODEL.SIE_CAMERA/SIE_VIEW ignored")
        return False, False, 1, 1, float(cfg.MODEL.SIE_COE)
    if not (cam or view):
        notes.append(f"the checkpoint has an SIE table of {rows} rows and no metadata; "
                     "taken as a camera embedding (set MODEL.SIE_VIEW True if it is a view table)")
        cam = True
    if cam and view:
        views = int(getattr(test_dataset, "num_train_vids", 0) or 0)
        if not views or rows % views:
            raise CheckpointMismatchError(
                f"cv_embed has {rows} rows = cameras x views, but without metadata beside the checkpoint the "
                f"split is unknown (test set views: {views or 'unknown'}); evaluate on the training dataset "
                "or turn MODEL.SIE_VIEW off")
        return True, True, rows // views, views, float(cfg.MODEL.SIE_COE)
    return cam, view, rows if cam else 1, rows if view else 1, float(cfg.MODEL.SIE_COE)


def check_metadata(sd: Mapping[str, torch.Tensor], meta: dict | None, path: str) -> None:
    """Refuse a metadata file that describes another model than the weights beside it.

    Its values must be of the types the training writes (:func:`utils.checkpoint.check_metadata_types`),
    then they are compared with what the tensors say: the image encoder (ViT-B-16 / RN50), the
    identities (classifier rows), the SIE table's rows and the feature width (the BNNecks). The
    error names the metadata file. (Metadata read from a file is also tied to the weights by
    their SHA-256: :func:`utils.checkpoint.read_metadata`.)
    """
    if meta is None:
        return
    where = metadata_path(path) if os.path.isfile(path) else "the metadata"
    check_metadata_types(meta, where)
    is_vit = "image_encoder.class_embedding" in sd
    name = "ViT-B-16" if is_vit else "RN50"
    bad = []
    if meta.get("model") and meta["model"] != name:
        bad.append(f"model {meta['model']} but the weights hold a {name} image encoder")
    rows = next((int(sd[k].shape[0]) for k in ("classifier.weight", "classifier_proj.weight") if k in sd), None)
    if rows is not None and meta.get("num_classes") is not None and int(meta["num_classes"]) != rows:
        bad.append(f"num_classes {meta['num_classes']} but the classifier has {rows} rows")
    if is_vit and "cv_embed" in sd and (meta.get("sie_camera") or meta.get("sie_view")):
        cams = int(meta.get("camera_num", 1)) if meta.get("sie_camera") else 1
        views = int(meta.get("view_num", 1)) if meta.get("sie_view") else 1
        if cams * views != int(sd["cv_embed"].shape[0]):
            bad.append(f"an SIE table of {cams * views} rows but cv_embed has {int(sd['cv_embed'].shape[0])}")
    if meta.get("feat_dim") is not None and {"bottleneck.weight", "bottleneck_proj.weight"} <= set(sd):
        width = int(sd["bottleneck.weight"].shape[0]) + int(sd["bottleneck_proj.weight"].shape[0])
        if int(meta["feat_dim"]) != width:
            bad.append(f"feat_dim {meta['feat_dim']} but the weights give {width}-d features")
    if bad:
        raise CheckpointMismatchError(f"{where} does not describe the weights in {path}: {'; '.join(bad)}; put the "
                                      "metadata file of these weights beside them, or move it away to size the "
                                      "model from the tensors alone")


def _vit_stride(cfg: Any, tokens: int) -> int | None:
    """The patch stride whose token grid on INPUT.SIZE_TRAIN has ``tokens`` patches (ViT-B-16
    at 256x128: 12 -> 210, 16 -> 128), or None when no single stride fits."""
    h, w = cfg.INPUT.SIZE_TRAIN
    patch = cfg.MODEL.CLIP_ARCH.VISION_PATCH_SIZE or 16
    fits = [s for s in range(1, patch + 1) if ((h - patch) // s + 1) * ((w - patch) // s + 1) == tokens]
    return fits[0] if len(fits) == 1 else None


def _inference_cfg(cfg: Any, sd: Mapping[str, torch.Tensor], meta: dict | None, test_dataset: Any
                   ) -> tuple[Any, SVLLReIDOptions, clip.CLIPArch, dict[str, int], list[str]]:
    """(cfg for the CLIP towers, model options, CLIP architecture, sizes, notes) for the model the
    checkpoint holds: the options are the config's (:func:`model_options_from_cfg`) with what the
    checkpoint decides (text side, SSL heads, SIE, prompt noun) overridden."""
    notes: list[str] = []
    is_vit = "image_encoder.class_embedding" in sd
    if not is_vit and "image_encoder.layer1.0.conv1.weight" not in sd:
        raise CheckpointMismatchError(
            f"{cfg.TEST.WEIGHT or 'the state dict'} holds no CLIP image encoder (no image_encoder.class_embedding or "
            f"image_encoder.layer1.*; first keys: {', '.join(list(sd)[:4])}): not an SVLL-ReID / CLIP-ReID checkpoint")
    icfg = cfg.clone()
    icfg.defrost()
    name = "ViT-B-16" if is_vit else "RN50"
    if icfg.MODEL.NAME != name:
        notes.append(f"the checkpoint holds a {name} image encoder: MODEL.NAME {icfg.MODEL.NAME} -> {name}")
        icfg.MODEL.NAME = name
    with_text = "prompt_learner.cls_ctx" in sd and "text_encoder.ln_final.weight" in sd
    meta_cfg = (meta or {}).get("config") or {}
    text_heads = int(((meta_cfg.get("MODEL") or {}).get("CLIP_ARCH") or {}).get("TEXT_HEADS", 0)
                     or cfg.MODEL.CLIP_ARCH.TEXT_HEADS or 0)
    arch = _arch_from_checkpoint(sd, text_heads, with_text)
    if is_vit:
        icfg.MODEL.CLIP_ARCH.VISION_PATCH_SIZE = arch.vision_patch_size
        stride = _vit_stride(icfg, int(sd["image_encoder.positional_embedding"].shape[0]) - 1)
        if stride is not None and list(icfg.MODEL.STRIDE_SIZE) != [stride, stride]:
            notes.append(f"the checkpoint's image grid means stride {stride}: MODEL.STRIDE_SIZE "
                         f"{list(icfg.MODEL.STRIDE_SIZE)} -> [{stride}, {stride}]")
            icfg.MODEL.STRIDE_SIZE = [stride, stride]
    over: dict[str, Any] = {"prompt_learning": with_text}
    if meta is not None:
        over["dataset_name"] = meta["dataset"]       # prompt noun (person / vehicle)
    # SSL heads: type and widths from the tensors
    if "image_mlp.layer3.weight" in sd:
        over.update(use_ssl=True, ssl_type="SIMCLR", ssl_hidden_dim=int(sd["image_mlp.layer1.weight"].shape[0]),
                    ssl_out_dim=int(sd["image_mlp.layer3.weight"].shape[0]))
    elif "image_mlp.linear1.weight" in sd:
        over.update(use_ssl=True, ssl_type="SIMSIAM")
    else:
        over["use_ssl"] = False
    over["use_ssl_stage1"] = with_text and "text_mlp.layer3.weight" in sd
    if over["use_ssl_stage1"] and "image_mlp.layer3.weight" not in sd:
        over.update(ssl_hidden_dim=int(sd["text_mlp.layer1.weight"].shape[0]),
                    ssl_out_dim=int(sd["text_mlp.layer3.weight"].shape[0]))
    cam, view, camera_num, view_num, coe = _sie_sizes(sd, meta, cfg, is_vit, test_dataset, notes)
    over.update(sie_camera=cam, sie_view=view, sie_coe=coe)
    options = dataclasses.replace(model_options_from_cfg(icfg), **over)
    for key in ("classifier.weight", "classifier_proj.weight", "prompt_learner.cls_ctx"):
        if key in sd:
            num_classes = int(sd[key].shape[0])
            break
    else:
        num_classes = int((meta or {}).get("num_classes", 1))
    return icfg, options, arch, {"num_classes": num_classes, "camera_num": camera_num, "view_num": view_num}, notes


# ----------------------------------------------------------------------------- building, loading
def input_grid(model: SVLLReID, size_hw: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the token grid an input of ``size_hw`` (h, w) gives, the grid ``model`` was built for): they
    must be equal, since the positional embedding has one entry per grid cell."""
    enc = model.image_encoder
    h, w = int(size_hw[0]), int(size_hw[1])
    if hasattr(enc, "attnpool"):         # ResNet: a stride-2 stem convolution (padding 1), then three halvings
        return (((h + 1) // 2) // 8, ((w + 1) // 2) // 8), tuple(enc.attnpool.grid_size)
    (kh, kw), (sh, sw) = enc.conv1.kernel_size, enc.conv1.stride
    return ((h - kh) // sh + 1, (w - kw) // sw + 1), tuple(enc.grid_size)


def _materialise(model: nn.Module) -> None:
    """Give every meta-device parameter/buffer uninitialised CPU storage (filled by the load)."""
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device="cpu")


def _build(icfg: Any, options: SVLLReIDOptions, arch: clip.CLIPArch, sizes: dict[str, int]) -> SVLLReID:
    """The model, its CLIP towers on the meta device (no init, no weights file), heads on the CPU."""
    h, w = feature_grid(icfg)
    with torch.device("meta"):
        clip_model = clip.CLIP(arch, h, w, int(icfg.MODEL.STRIDE_SIZE[0]))
    return SVLLReID(clip_model, sizes["num_classes"], sizes["camera_num"], sizes["view_num"], options)


def _show(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _load(model: SVLLReID, sd: dict[str, torch.Tensor], source: str, grid_hint: str) -> list[str]:
    """Load ``sd`` (retrieval keys strictly); drop training-only parts that are absent or do not
    fit. Returns one description per part left out or initialised at random."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    shaped = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    known = RETRIEVAL_PREFIXES + tuple(p for ps in TRAINING_ONLY_PARTS.values() for p in ps)
    unknown = [k for k in sd if k not in own and not k.startswith(known)]
    bad_missing = [k for k in missing if k.startswith(RETRIEVAL_PREFIXES)]
    bad_shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in shaped if k.startswith(RETRIEVAL_PREFIXES)]
    if bad_missing or bad_shaped or unknown:
        parts = [f"{name} ({len(ks)}): {_show(ks)}" for name, ks in
                 (("missing retrieval keys", bad_missing), ("mis-shaped retrieval keys", bad_shaped),
                  ("unexpected keys", unknown)) if ks]
        hint = grid_hint if any("positional_embedding" in s for s in bad_shaped) else ""
        raise CheckpointMismatchError(f"{source} does not fit the model — " + "; ".join(parts) + hint)

    left_out: list[str] = []
    for part, prefixes in TRAINING_ONLY_PARTS.items():
        in_model = [k for k in own if k.startswith(prefixes)]
        in_ckpt = [k for k in sd if k.startswith(prefixes)]
        p_missing = [k for k in missing if k.startswith(prefixes)]
        p_shaped = [k for k in shaped if k.startswith(prefixes)]
        if not in_model:
            if in_ckpt:
                left_out.append(f"{part}: incomplete in the checkpoint, not built")
            elif part != "text SSL head" or model.prompt_learning:
                left_out.append(f"{part}: absent")
            for k in in_ckpt:
                del sd[k]
            continue
        if not (p_missing or p_shaped):
            continue
        why = (f"mis-shaped {_show(p_shaped, 2)}" if p_shaped else f"missing {_show(p_missing, 2)}")
        if part == "classifiers":
            left_out.append(f"{part}: {why}, random init")
            for k in p_shaped:
                del sd[k]
            continue
        left_out.append(f"{part}: {why}, left out")
        for k in in_ckpt:
            del sd[k]
        if part.startswith("text side"):
            del model.prompt_learner, model.text_encoder
            model.prompt_learning = model.use_ssl_stage1 = False
        elif part == "image SSL head":
            del model.image_mlp
            model.use_ssl = False
        else:
            del model.text_mlp
            model.use_ssl_stage1 = False
    _materialise(model)   # what is still on the meta device is about to be overwritten by the load
    result = model.load_state_dict(sd, strict=False)
    still = [k for k in result.missing_keys
             if not k.endswith("num_batches_tracked") and not k.startswith(TRAINING_ONLY_PARTS["classifiers"])]
    if still or result.unexpected_keys:    # cannot happen after the checks above; never evaluate garbage
        raise CheckpointMismatchError(f"{source}: keys left unloaded: {_show(still + result.unexpected_keys)}")
    for k in result.missing_keys:
        if k.endswith("num_batches_tracked"):
            model.get_buffer(k).zero_()
    return left_out


def camera_numbers(meta: dict | None) -> dict[int, int]:
    """The checkpoint's training camera numbering (camera number as written -> SIE row) from its
    metadata; empty for metadata written before it was stored (then: number - 1)."""
    ident = (meta or {}).get("dataset_identity") or {}
    return {int(n): int(i) for n, i in (ident.get("camera_numbers") or {}).items()}


def _same_dataset(meta: dict | None, cfg: Any, test_dataset: Any) -> tuple[bool | None, str]:
    """(is the test set the checkpoint's training dataset, why); None when unknown (no metadata).

    Decided from what identifies a dataset, never from where it lies: the name, and for the
    user's ``folder`` sets (all named 'folder') the fingerprint of the query/gallery files
    stored in the metadata (:func:`datasets.bases.dataset_identity`). Without a test set (the
    tools, on image folders) the configured dataset name decides. Metadata written before the
    fingerprint: the same folder, or one with as many cameras as the SIE table.
    """
    if meta is None or not meta.get("dataset"):
        return None, "no metadata"
    trained, tested = meta["dataset"], cfg.DATASETS.NAMES
    if trained != tested:
        return False, f"cross-dataset: trained on {trained}, tested on {tested}"
    if test_dataset is None:
        return True, (f"images named by camera number; the config's dataset {tested} is the checkpoint's training "
                      "dataset, so its trained cameras apply; a camera it never saw gets no embedding")
    if trained != "folder":
        return True, f"the test set is the checkpoint's training dataset ({trained})"
    ident = meta.get("dataset_identity") or {}
    if ident.get("fingerprint"):
        from datasets.bases import dataset_identity
        if dataset_identity(test_dataset)["fingerprint"] == ident["fingerprint"]:
            return True, ("the test set is the checkpoint's training dataset, with the same query/gallery files "
                          "wherever it lies")
        return False, ("cross-dataset: this folder's query/gallery files differ from those of the checkpoint's "
                       "training data, by the content fingerprint in the metadata")
    trained_root = os.path.realpath(meta.get("dataset_root", ""))
    if trained_root == os.path.realpath(os.path.expanduser(cfg.DATASETS.ROOT_DIR)):
        return True, "the test set is the checkpoint's training folder"
    if int(getattr(test_dataset, "num_train_cams", -1)) == int(meta.get("camera_num", -2)):
        return True, (f"metadata without a dataset fingerprint, written by an older version: trained on "
                      f"{trained_root}, tested on {cfg.DATASETS.ROOT_DIR}, same camera count as the SIE table, taken "
                      "as the same data moved; TEST.USE_SIE no leaves SIE out")
    return False, (f"cross-dataset: trained on {trained_root}, tested on {cfg.DATASETS.ROOT_DIR}; the metadata has no "
                   "dataset fingerprint and the camera count differs from the SIE table's")


def decide_use_sie(model: SVLLReID, cfg: Any, meta: dict | None, test_dataset: Any = None) -> tuple[bool, str]:
    """(use the SIE table at test time, why) under TEST.USE_SIE: the one decision that evaluation
    and the tools (``test_dataset`` None: image folders) share.

    'auto': only when the test set is the checkpoint's own dataset (:func:`_same_dataset`: name
    and content fingerprint from the metadata, not the folder's location; without metadata, when
    the test set has exactly as many cameras/views as the table) and its camera/view ids fit the
    table. 'yes'/'no' force it ('yes' still needs ids that fit).
    """
    if not model.has_sie:
        return False, "the model has no SIE table"
    mode = cfg.TEST.USE_SIE
    if mode == "no":
        return False, "TEST.USE_SIE no"
    fit, counts_equal = True, True
    if test_dataset is not None:
        samples = list(test_dataset.query) + list(test_dataset.gallery)
        for flag, idx, n, what in ((model.sie_camera, 2, model.camera_num, "camera"),
                                   (model.sie_view, 3, model.view_num, "view")):
            if not flag:
                continue
            top = max(s[idx] for s in samples)
            n_test = test_dataset.num_train_cams if idx == 2 else test_dataset.num_train_vids
            counts_equal &= n_test == n
            if top >= n:
                fit = False
                if mode == "yes":
                    raise ConfigError(
                        f"TEST.USE_SIE yes, but the test set has {what} id {top} and the checkpoint's SIE table "
                        f"knows {n} {what}s; use TEST.USE_SIE auto or no")
    if mode == "yes":
        return True, "TEST.USE_SIE yes"
    same, why = _same_dataset(meta, cfg, test_dataset)
    if same is False:
        return False, why
    if not fit:
        return False, "the test set's camera/view ids do not fit the SIE table"
    if same is None and test_dataset is not None and not counts_equal:
        return False, "no metadata and the test set's camera/view count differs from the SIE table's"
    if same is None:
        return True, ("no metadata; the test set's camera/view count equals the SIE table's" if test_dataset
                      is not None else "no metadata and no test set to check")
    return True, why


def _align_test_set(test_dataset: Any, meta: dict) -> None:
    """A test set named like the checkpoint's training dataset: number its cameras as training did
    (one convention: the metadata's camera number -> SIE row) and warn when its query/gallery
    identities are training identities."""
    from datasets.bases import renumber_cameras
    from datasets.make_dataloader import warn_train_identities_in_test
    if renumber_cameras(test_dataset, camera_numbers(meta)):
        logger.info("Test cameras numbered as in training: %s", ", ".join(
            f"c{n} -> {i}" for n, i in sorted(test_dataset.camera_numbers.items())))
    ident = meta.get("dataset_identity") or {}
    if ident.get("train_pids"):
        warn_train_identities_in_test(test_dataset, ident["train_pids"], "the checkpoint's training data")


def load_for_inference(cfg: Any, test_dataset: Any = None) -> tuple[SVLLReID, dict[str, Any]]:
    """Build the model sized from the checkpoint ``cfg.TEST.WEIGHT`` (and its metadata file, if
    any), load it, and return ``(model in eval mode on the CPU, info)``.

    Retrieval-path keys load strictly; training-only parts may be absent (one log line).
    ``info``: 'weight', 'num_classes', 'camera_num', 'view_num', 'sie_camera', 'sie_view'
    (the model has a trained camera / view table), 'use_sie' (side information is used for
    ``test_dataset``; see :func:`decide_use_sie`), 'sie_reason', 'dataset' (the checkpoint's
    training dataset or None), 'feat_dim', 'model_name', 'metadata', 'left_out'.
    The model's ``sie_at_test`` is set to 'use_sie', so ``retrieval_features`` applies it.
    """
    path = cfg.TEST.WEIGHT
    if not path:
        raise ConfigError("TEST.WEIGHT is empty: give the checkpoint to evaluate, e.g. TEST.WEIGHT out/ViT-B-16_60.pth")
    return load_state_for_inference(cfg, read_state_dict(path), read_metadata(path), test_dataset, path)


def load_state_for_inference(cfg: Any, sd: Mapping[str, torch.Tensor], meta: dict | None = None,
                             test_dataset: Any = None, path: str = "state dict"
                             ) -> tuple[SVLLReID, dict[str, Any]]:
    """:func:`load_for_inference` on a state dict already in memory (``module.`` prefixes allowed)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    check_metadata(sd, meta, path)
    icfg, options, arch, sizes, notes = _inference_cfg(cfg, sd, meta, test_dataset)
    model = _build(icfg, options, arch, sizes)
    hint = (f" (the image grid follows INPUT.SIZE_TRAIN {list(cfg.INPUT.SIZE_TRAIN)} and MODEL.STRIDE_SIZE "
            f"{list(cfg.MODEL.STRIDE_SIZE)}: give the values the checkpoint was trained with)")
    left_out = _load(model, dict(sd), path, hint)
    model.eval()
    got, built = input_grid(model, icfg.INPUT.SIZE_TEST)
    if got != built:
        raise ConfigError(f"INPUT.SIZE_TEST {list(icfg.INPUT.SIZE_TEST)} gives a {got[0]}x{got[1]} "
                          f"{'patch' if model.is_vit else 'feature-map'} grid, but {path} was built for "
                          f"{built[0]}x{built[1]} (INPUT.SIZE_TRAIN {list(icfg.INPUT.SIZE_TRAIN)}); give "
                          f"INPUT.SIZE_TEST {list(icfg.INPUT.SIZE_TRAIN)}, the size it was trained at")
    for note in notes:
        logger.info("%s", note)
    if left_out:
        logger.info("Training-only parts not loaded (evaluation uses only the image encoder, BNNeck and SIE): %s",
                    "; ".join(left_out))
    if test_dataset is not None and meta is not None and meta.get("dataset") == cfg.DATASETS.NAMES:
        _align_test_set(test_dataset, meta)
    use_sie, reason = decide_use_sie(model, cfg, meta, test_dataset)
    model.sie_at_test = use_sie
    if model.has_sie:
        logger.info("SIE at test time: %s; %s", "used" if use_sie else "not used", reason)
    info = {"weight": path, "num_classes": model.num_classes, "camera_num": model.camera_num,
            "view_num": model.view_num, "sie_camera": bool(model.sie_camera), "sie_view": bool(model.sie_view),
            "use_sie": use_sie, "sie_reason": reason, "dataset": (meta or {}).get("dataset"),
            "feat_dim": model.feat_dim, "model_name": icfg.MODEL.NAME, "metadata": meta, "left_out": left_out}
    logger.info("Loaded %s: %s, %d identities, SIE %s, feature %d-d%s", path, icfg.MODEL.NAME, model.num_classes,
                "camera" * model.sie_camera + "+" * (model.sie_camera and model.sie_view) + "view" * model.sie_view
                or "none", model.feat_dim, f", trained on {info['dataset']}" if info["dataset"] else "")
    return model, info
