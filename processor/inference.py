"""Feature extraction and evaluation (mAP / CMC / mINP, optional re-ranking)."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from utils.metrics import R1_mAP_eval

from .common import autocast, progress, to_device

logger = logging.getLogger("svllreid")


@torch.no_grad()
def extract_features(cfg: Any, model: nn.Module, loader: DataLoader, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Retrieval features (eval mode) with pids, camids and paths, in loader order."""
    was_training = model.training
    model.eval()
    feats, pids, camids, paths = [], [], [], []
    for batch in progress(loader, len(loader), "extracting features"):
        batch = to_device(batch, device)
        with autocast(device):
            f = model(batch["img"], cam_label=batch["camid"] if cfg.MODEL.SIE_CAMERA else None,
                      view_label=batch["viewid"] if cfg.MODEL.SIE_VIEW else None)
        feats.append(f.float())
        pids.append(batch["pid"].cpu())
        camids.append(batch["camid"].cpu())
        paths.extend(batch["path"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(pids), torch.cat(camids), paths


def do_inference(cfg: Any, model: nn.Module, val_loader: DataLoader, num_query: int,
                 device: torch.device) -> dict[str, Any]:
    """Evaluate on query + gallery; returns {'mAP', 'cmc' (top-MAX_RANK), 'mINP', ...} and logs them."""
    t0 = time.time()
    feats, pids, camids, _ = extract_features(cfg, model, val_loader, device)
    t_feat = time.time() - t0
    evaluator = R1_mAP_eval.from_cfg(cfg, num_query)
    evaluator.reset()
    evaluator.update((feats, pids, camids))
    cmc, mAP, mINP = evaluator.compute()
    results = {"mAP": float(mAP), "cmc": [float(x) for x in cmc], "mINP": float(mINP),
               "dataset": cfg.DATASETS.NAMES, "re_ranking": bool(cfg.TEST.RE_RANKING),
               "num_query": int(num_query), "num_gallery": int(feats.shape[0] - num_query)}
    logger.info("Validation results (%s%s): mAP %.1f%%  mINP %.1f%%  %s  [features %.1fs, %.0f img/s]",
                cfg.DATASETS.NAMES, ", re-ranked" if cfg.TEST.RE_RANKING else "", 100 * mAP, 100 * mINP,
                "  ".join(f"R{r} {100 * cmc[r - 1]:.1f}%" for r in (1, 5, 10) if r <= len(cmc)),
                t_feat, feats.shape[0] / max(t_feat, 1e-9))
    return results
