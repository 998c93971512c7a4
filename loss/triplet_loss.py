"""Batch-hard triplet loss (Hermans et al., 2017) with hard or soft margin."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["euclidean_dist", "hard_example_mining", "TripletLoss"]


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances (m, n) via ``sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, 1e-12))``.

    The clamp keeps the sqrt differentiable at zero distance (e.g. on the diagonal).
    """
    # float32 with autocast off: the expansion cancels badly in half precision.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        xx = x.pow(2).sum(1, keepdim=True)
        yy = y.pow(2).sum(1, keepdim=True).t()
        dist = xx + yy - 2.0 * (x @ y.t())
        return dist.clamp(min=1e-12).sqrt()


def hard_example_mining(
    dist_mat: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each anchor, the hardest positive and hardest negative distance.

    Hardest positive = largest distance to a same-label sample (the anchor itself
    included, so a lone identity gets its ~0 self-distance); hardest negative =
    smallest distance to a different-label sample (``inf`` when the batch holds a
    single identity, which makes its ranking term zero). Works for any number of
    images per identity, unlike fixed-shape ``view`` tricks.
    """
    is_pos = labels.unsqueeze(0) == labels.unsqueeze(1)
    dist_ap = dist_mat.masked_fill(~is_pos, float("-inf")).max(dim=1).values
    dist_an = dist_mat.masked_fill(is_pos, float("inf")).min(dim=1).values
    return dist_ap, dist_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss on Euclidean distances.

    ``margin`` given: ``MarginRankingLoss(margin)(d_an, d_ap, 1)`` = mean(relu(d_ap - d_an + m)).
    ``margin=None``: soft margin ``SoftMarginLoss(d_an - d_ap, 1)`` = mean(log(1 + exp(d_ap - d_an))).
    """

    def __init__(self, margin: float | None = None) -> None:
        super().__init__()
        self.margin = margin
        self.ranking_loss = nn.MarginRankingLoss(margin=margin) if margin is not None else nn.SoftMarginLoss()

    def forward(
        self, feat: torch.Tensor, labels: torch.Tensor, normalize_feature: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(loss, dist_ap, dist_an)``; the distances are per anchor, shape (B,)."""
        feat = feat.float()
        if normalize_feature:
            feat = F.normalize(feat, dim=-1)
        dist_ap, dist_an = hard_example_mining(euclidean_dist(feat, feat), labels)
        y = torch.ones_like(dist_an)
        if self.margin is not None:
            loss = self.ranking_loss(dist_an, dist_ap, y)
        else:
            loss = self.ranking_loss(dist_an - dist_ap, y)
        return loss, dist_ap, dist_an
