"""Center loss (Wen et al., ECCV 2016): pull each feature towards its class centre."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["CenterLoss"]


class CenterLoss(nn.Module):
    """loss = sum_i clamp(||x_i - c_{y_i}||^2, 1e-12, 1e12) / batch_size.

    The centres are an ``nn.Parameter`` (randn init) trained by their own optimiser;
    they live on whatever device the module is moved to.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: (B, feat_dim) features; labels: (B,) class indices."""
        if x.shape[1] != self.feat_dim:
            raise ValueError(f"CenterLoss expects features of width {self.feat_dim}, got {x.shape[1]}")
        diff = x.float() - self.centers.float()[labels.long()]
        sq_dist = diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12)
        return sq_dist.sum() / x.shape[0]
