"""ONNX export of the retrieval path, checked with ``onnx.checker`` and onnxruntime.

The exported graph maps a preprocessed image batch (float32, N x 3 x H x W, normalised as
the test transform does) to the retrieval feature that evaluation computes (``forward``
in eval mode: ``cat([feat, proj])`` before or after the BNNeck per TEST.NECK_FEAT, not
L2-normalised). When the model has a trained side-information table (ViT with SIE), the
graph takes int64 ``camid`` and/or ``viewid`` inputs of shape (N,) with the same indices as
the dataset gives (0-based) and looks the table up in the graph, exactly as the model does:
camera and view together index row ``camid * view_num + viewid``.

The batch axis is dynamic. The exporter is ``torch.onnx.export(dynamo=True)`` (torch.export
based; the TorchScript exporter is deprecated). A file is only written to its final path
after the onnxruntime output matched PyTorch's within the tolerance on a real batch and on a
single image.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from config import ConfigError
from datasets.device_transforms import DeviceTransform
from datasets.transforms import TEST_INTERPOLATION, build_loader_transform
from model import SVLLReID, load_for_inference
from model.loading import camera_numbers
from utils.errors import import_extra
from utils.fileio import follow_umask
from utils.images import IMAGE_EXTENSIONS, list_images, read_image

logger = logging.getLogger("svllreid")

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
OUTPUT_NAME = "features"
IMAGE_INPUT = "images"


class ExportVerificationError(RuntimeError):
    """onnxruntime's features differ from PyTorch's by more than the tolerance."""


# ----------------------------------------------------------------------------- loading
def eval_dataset(cfg: Any) -> tuple[Any, str]:
    """The configured dataset (its query images serve the check), or None and why it could not be read."""
    from datasets.make_dataloader import build_dataset_from_cfg
    try:
        return build_dataset_from_cfg(cfg), ""
    except (OSError, ValueError) as e:
        note = " ".join(str(e).split())
        return None, note if len(note) <= 100 else note[:100] + "..."


# ----------------------------------------------------------------------------- graph
def side_inputs(info: Mapping[str, Any]) -> list[str]:
    """Names of the int64 side-information inputs the graph takes (may be empty)."""
    if not info["use_sie"]:
        return []
    return [n for n, on in (("camid", info["sie_camera"]), ("viewid", info["sie_view"])) if on]


def retrieval(model: SVLLReID, images: torch.Tensor, side: Sequence[str], values: Sequence[torch.Tensor]
              ) -> torch.Tensor:
    """The evaluation's retrieval feature, with the side inputs ``side`` set to ``values``."""
    labels = dict(zip(side, values))
    return model(images, cam_label=labels.get("camid"), view_label=labels.get("viewid"))


class RetrievalGraph(nn.Module):
    """``(images, *side) -> retrieval feature``: the eval-mode forward with side inputs by name."""

    def __init__(self, model: SVLLReID, side: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.side = tuple(side)

    def forward(self, images: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        return retrieval(self.model, images, self.side, side)


def metadata(cfg: Any, model: SVLLReID, info: Mapping[str, Any], opset: int) -> dict[str, str]:
    """What a deployer needs to feed the graph and use its output (ONNX ``metadata_props``)."""
    side = side_inputs(info)
    h, w = (int(v) for v in cfg.INPUT.SIZE_TEST)
    weight = info["weight"]
    with open(weight, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "model": str(model.model_name),
        "input_size": f"{h},{w}",
        "input_layout": f"NCHW float32 RGB in [0, 1] after {TEST_INTERPOLATION.value} resize to input_size, "
                        "then (x - mean) / std",
        "pixel_mean": ",".join(f"{float(v):g}" for v in cfg.INPUT.PIXEL_MEAN),
        "pixel_std": ",".join(f"{float(v):g}" for v in cfg.INPUT.PIXEL_STD),
        "resize_interpolation": TEST_INTERPOLATION.value,
        "feat_dim": str(int(info["feat_dim"])),
        "neck_feat": str(cfg.TEST.NECK_FEAT),
        "feat_norm": str(cfg.TEST.FEAT_NORM),
        "uses_sie": "true" if side else "false",
        "sie_inputs": ",".join(side),
        "sie_cameras": str(int(info["camera_num"])) if info["sie_camera"] else "0",
        "sie_views": str(int(info["view_num"])) if info["sie_view"] else "0",
        # camera number as written in names -> camid, the training set's numbering (empty: camid = number - 1)
        "sie_camera_numbers": ",".join(f"{n}:{i}" for n, i in sorted(camera_numbers(info.get("metadata")).items()))
        if "camid" in side else "",
        "stride_size": ",".join(str(int(v)) for v in model.image_encoder.conv1.stride) if model.is_vit else "",
        "checkpoint": os.path.abspath(weight),
        "checkpoint_sha256": digest,
        "opset": str(opset),
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
    }


def _side_values(info: Mapping[str, Any], side: Sequence[str], n: int,
                 given: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Side indices for ``n`` images: ``given`` ones if they fit the table, else cycling through its rows."""
    out = []
    for name in side:
        size = max(int(info["camera_num"] if name == "camid" else info["view_num"]), 1)
        if given is not None and name in given and int(given[name][:n].max()) < size:
            out.append(given[name][:n].to(torch.int64))
        else:
            out.append(torch.arange(n, dtype=torch.int64) % size)
    return out


def export_graph(model: SVLLReID, info: Mapping[str, Any], path: str, meta: Mapping[str, str],
                 input_size: Sequence[int], batch: int = 2, opset: int = DEFAULT_OPSET) -> None:
    """Export the retrieval graph (dynamic batch) to one self-contained ``.onnx`` file with ``meta``."""
    onnx = import_extra("onnx", "export")
    side = side_inputs(info)
    graph = RetrievalGraph(model, side).eval()
    h, w = (int(v) for v in input_size)
    args = (torch.zeros(batch, 3, h, w),) + tuple(_side_values(info, side, batch))
    dim = torch.export.Dim("batch")
    shapes = ({0: dim}, tuple({0: dim} for _ in side)) if side else ({0: dim},)   # images, *side
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")           # exporter chatter (axis renaming, deprecations, a failed
        # conversion to an older opset, which falls back silently: checked below)
        program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset, verbose=False,
                                    input_names=[IMAGE_INPUT, *side], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=shapes, external_data=False)
    proto = program.model_proto
    written = opset_of(proto)
    if written != opset:    # the exporter falls back to its own opset when it cannot convert the graph
        raise ConfigError(f"--opset {opset}: the exporter cannot write this graph in opset {opset} (it wrote "
                          f"opset {written}); use --opset {written} or another version it can convert to; "
                          "no file written")
    del proto.metadata_props[:]
    for k, v in {**meta, "opset": str(written)}.items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = "SVLL-ReID retrieval features; see metadata_props for the preprocessing"
    onnx.save(proto, path)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors that stop the export from the named loggers (their warnings and tracebacks of
    handled failures would break the one-line error convention)."""
    saved = {n: logging.getLogger(n).level for n in loggers}
    for n in loggers:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def opset_of(proto: Any) -> int:
    """The default-domain (``ai.onnx``) opset a model proto imports."""
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# ----------------------------------------------------------------------------- verification
def image_paths(paths: Sequence[str]) -> list[str]:
    """Image files among ``paths`` (each folder's images, sorted; files as given)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(p, f) for f in list_images(p)]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(paths)}")
    return files


def verification_batch(cfg: Any, n: int, images: Sequence[str] | None = None, dataset: Any = None,
                       why_not: str = "") -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
    """``n`` real images through the test transform (with their camera/view ids), and where from.

    From ``images`` if given, else the first query images of ``dataset``; without either, a
    random normal batch (said so in the returned description, with ``why_not``).
    """
    transform = build_loader_transform(cfg, is_train=False)
    ids: dict[str, torch.Tensor] = {}
    if images:
        files = image_paths(images)[:n]
        source = f"{len(files)} image(s) from {', '.join(images)}"
    elif dataset is not None:
        samples = dataset.query[:n]
        files = [s[0] for s in samples]
        ids = {"camid": torch.tensor([s[2] for s in samples]), "viewid": torch.tensor([s[3] for s in samples])}
        source = f"{len(files)} query image(s) of {cfg.DATASETS.NAMES} under {cfg.DATASETS.ROOT_DIR}"
    else:
        h, w = (int(v) for v in cfg.INPUT.SIZE_TEST)
        return (torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0)), {},
                f"random normal input (no --images, and {cfg.DATASETS.NAMES} under {cfg.DATASETS.ROOT_DIR} "
                f"could not be read: {why_not})")
    uint8 = torch.stack([transform(read_image(f)) for f in files])
    return DeviceTransform.from_cfg(cfg, is_train=False).image(uint8), ids, source


def _torch_features(model: SVLLReID, side: Sequence[str], x: torch.Tensor,
                    values: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return retrieval(model, x, side, values)


def compare(path: str, model: SVLLReID, info: Mapping[str, Any], images: torch.Tensor,
            ids: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Max abs difference onnxruntime vs PyTorch eval features, for the whole batch and image 0 alone."""
    ort = import_extra("onnxruntime", "export")
    side = side_inputs(info)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    values = _side_values(info, side, images.shape[0], ids)
    results = []
    for n in sorted({images.shape[0], 1}, reverse=True):
        x, s = images[:n], [v[:n] for v in values]
        ref = _torch_features(model, side, x, s).numpy()
        feed = {IMAGE_INPUT: x.numpy(), **{k: v.numpy() for k, v in zip(side, s)}}
        out = session.run([OUTPUT_NAME], feed)[0]
        if out.shape != ref.shape:
            raise ExportVerificationError(f"onnxruntime output {out.shape} vs PyTorch {ref.shape} for batch {n}")
        results.append({"batch": n, "max_abs_diff": float(np.abs(out - ref).max()),
                        "max_abs_feature": float(np.abs(ref).max())})
    return results


# ----------------------------------------------------------------------------- the whole job
@dataclass
class ExportReport:
    """What was exported and how it was checked."""

    path: str
    metadata: dict[str, str]
    inputs: list[str]
    checks: list[dict[str, Any]]
    source: str
    atol: float
    seconds: float
    size_bytes: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def export(cfg: Any, out: str, batch: int = 2, verify_batch: int = 5, opset: int = DEFAULT_OPSET,
           atol: float = DEFAULT_ATOL, images: Sequence[str] | None = None) -> ExportReport:
    """Load TEST.WEIGHT, export to ``out``, check with onnx.checker and onnxruntime, then move into place.

    Raises ``ExportVerificationError`` (and leaves no file at ``out``) when onnxruntime differs
    from PyTorch by more than ``atol`` on the verification batch or on a single image.
    """
    onnx = import_extra("onnx", "export")
    t0 = time.perf_counter()
    dataset, why_not = eval_dataset(cfg)
    model, info = load_for_inference(cfg, dataset)
    x, ids, source = verification_batch(cfg, verify_batch, images, dataset, why_not)
    try:
        side = side_inputs(info)
        _torch_features(model, side, x[:1], _side_values(info, side, 1, ids))
    except ValueError as e:
        raise ConfigError(f"INPUT.SIZE_TEST {list(cfg.INPUT.SIZE_TEST)} does not fit the model built for "
                          f"INPUT.SIZE_TRAIN {list(cfg.INPUT.SIZE_TRAIN)}: {e}") from e
    meta = metadata(cfg, model, info, opset)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".onnx.tmp")
    os.close(fd)
    try:
        export_graph(model, info, tmp, meta, cfg.INPUT.SIZE_TEST, batch=batch, opset=opset)
        onnx.checker.check_model(tmp, full_check=True)
        checks = compare(tmp, model, info, x, ids)
        bad = [c for c in checks if not c["max_abs_diff"] <= atol]
        if bad:
            raise ExportVerificationError(
                "onnxruntime differs from PyTorch: " + "; ".join(
                    f"batch {c['batch']}: max abs diff {c['max_abs_diff']:.3g} > {atol:g}" for c in bad)
                + f" (features up to {max(c['max_abs_feature'] for c in checks):.3g}); no file written")
        follow_umask(tmp)      # mkstemp made it 0600; checkpoints and results follow the umask too
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ExportReport(path=out, metadata=meta, inputs=[IMAGE_INPUT, *side_inputs(info)], checks=checks,
                        source=source, atol=atol, seconds=time.perf_counter() - t0,
                        size_bytes=os.path.getsize(out), info=dict(info))


def read_onnx_metadata(path: str) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file."""
    onnx = import_extra("onnx", "export")
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
