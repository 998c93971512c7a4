"""The benchmark evaluation: feature extraction, mAP / CMC / mINP (optional re-ranking), its pictures."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from utils.dist import broadcast_object, is_main_process
from utils.distance import DistanceSpec, check_finite_features
from utils.metrics import QueryCounts, R1_mAP_eval

from .batches import encode_loader
from .compiled import fixed_batch_encode

logger = logging.getLogger("svllreid")


def extract_features(cfg: Any, model: nn.Module, loader: DataLoader, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Retrieval features (eval mode) with pids and camids, in loader order (sharded under DDP).

    Every feature comes from ``model.retrieval_features`` with the camera and view labels
    (:func:`encode_retrieval`); the model applies its SIE table or not (``sie_at_test``, see
    ``model.loading.decide_use_sie``). A compiled model (SOLVER.COMPILE) runs its last partial
    batch padded to the full size (:func:`processor.compiled.fixed_batch_encode`).
    """
    encode = fixed_batch_encode(encode_retrieval, model, loader.batch_size, "evaluation batch")
    return encode_loader(model, loader, device, encode, "extracting features")


def encode_retrieval(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The retrieval features of a batch (eval mode): ``net.retrieval_features`` with the batch's
    camera and view labels, called through ``forward`` so that a compiled model runs compiled."""
    return net(batch["img"], cam_label=batch["camid"], view_label=batch["viewid"])


def evaluate_features(cfg: Any, feats: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor,
                      num_query: int) -> dict[str, Any]:
    """mAP / CMC / mINP of query-then-gallery features with the configured protocol.

    Non-finite features (a diverged or damaged model) are refused: they would give a
    meaningless ranking and a number that looks like a result. The metrics average over the
    evaluated queries only: ``num_query`` (given), ``num_evaluated``, ``num_dropped`` and
    ``dropped_reason`` say how many were left out and why (``utils.metrics.QueryCounts``).
    """
    check_finite_features(feats, "evaluation")
    evaluator = R1_mAP_eval.from_cfg(cfg, num_query)
    evaluator.reset()
    evaluator.update((feats, pids.cpu(), camids.cpu()))
    cmc, mAP, mINP, counts = evaluator.compute(return_counts=True)
    return {"mAP": float(mAP), "cmc": [float(x) for x in cmc], "mINP": float(mINP),
            "dataset": cfg.DATASETS.NAMES, "re_ranking": evaluator.reranking,
            **counts.as_results(), "num_gallery": int(feats.shape[0] - num_query)}


@dataclass
class Evaluation:
    """An evaluation's results and what they were computed from (for the evaluation pictures)."""

    results: dict[str, Any]        # {'mAP', 'cmc' (top-MAX_RANK), 'mINP', ...}
    feats: torch.Tensor            # query rows first, then gallery
    pids: torch.Tensor
    camids: torch.Tensor
    num_query: int
    samples: list | None           # the loader's samples, in the order of ``feats`` (None if unknown)


def evaluate_loader(cfg: Any, model: nn.Module, val_loader: DataLoader, num_query: int,
                    device: torch.device) -> Evaluation:
    """Evaluate on query + gallery; the results (on every rank) with the features evaluated.

    The metrics (and re-ranking) run on rank 0 only and are broadcast.
    """
    t0 = time.time()
    feats, pids, camids = extract_features(cfg, model, val_loader, device)
    t_feat = time.time() - t0
    results = evaluate_features(cfg, feats, pids, camids, num_query) if is_main_process() else None
    results = broadcast_object(results)
    cmc = results["cmc"]
    logger.info("Validation results (%s%s): mAP %.1f%%  mINP %.1f%%  %s  [features %.1fs, %.0f img/s]",
                cfg.DATASETS.NAMES, ", re-ranked" if results["re_ranking"] else "", 100 * results["mAP"],
                100 * results["mINP"],
                "  ".join(f"R{r} {100 * cmc[r - 1]:.1f}%" for r in (1, 5, 10) if r <= len(cmc)),
                t_feat, feats.shape[0] / max(t_feat, 1e-9))
    counts = QueryCounts(results["num_query"], results["num_evaluated"], **results["dropped_reason"])
    logger.log(logging.WARNING if counts.dropped else logging.INFO, "Queries: %s", counts.describe())
    samples = getattr(getattr(val_loader, "dataset", None), "samples", None)
    return Evaluation(results, feats, pids, camids, num_query, samples)


def do_inference(cfg: Any, model: nn.Module, val_loader: DataLoader, num_query: int,
                 device: torch.device) -> dict[str, Any]:
    """Evaluate on query + gallery; returns {'mAP', 'cmc' (top-MAX_RANK), 'mINP', ...} on every rank
    (:func:`evaluate_loader` without the features)."""
    return evaluate_loader(cfg, model, val_loader, num_query, device).results


def visualize_evaluation(cfg: Any, feats: torch.Tensor, samples: Sequence[tuple], num_query: int,
                         results: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """TEST.VISUALIZE: CMC curve + ranked lists of the TEST.VISUALIZE_N worst and best queries in ``out_dir``,
    ranked by the evaluation's distance rule (row blocks in bounded memory, unless re-ranked)."""
    from utils.visualize import evaluation_pictures
    spec = DistanceSpec.from_cfg(cfg)
    blocks = spec.blocks(feats[:num_query], feats[num_query:])
    out = evaluation_pictures(blocks, samples[:num_query], samples[num_query:], results, out_dir,
                              n=int(cfg.TEST.VISUALIZE_N), topk=int(cfg.TEST.VISUALIZE_TOPK),
                              size_hw=cfg.INPUT.SIZE_TEST, dataset=str(cfg.DATASETS.NAMES), distance=spec.name)
    logger.info("Evaluation pictures: %s and %d ranked lists (worst_*.png, best_*.png) in %s", out["cmc"],
                len(out["worst"]) + len(out["best"]), out_dir)
    return out
