"""Supervised contrastive loss between two feature sets (CLIP-ReID stage 1)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """Image-text supervised contrastive loss (Khosla et al., 2020, as used by CLIP-ReID).

    Row ``i`` of ``a`` is contrasted against every row of ``b``: logits = a @ b.T / T
    (raw features, T = 1.0 as published), log-softmax over the row, and the loss of the
    row is minus the mean log-probability of its positives (entries of ``b`` with the
    same label). The loss is the mean over rows; rows without any positive (impossible
    when ``a`` and ``b`` carry the same labels) are left out of the mean.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, a_labels: torch.Tensor, b_labels: torch.Tensor
    ) -> torch.Tensor:
        """a: (M, d), b: (N, d), a_labels: (M,), b_labels: (N,) -> scalar loss."""
        with torch.autocast(device_type=a.device.type, enabled=False):  # float32 logits under AMP
            logits = (a.float() @ b.float().t()) / self.temperature
        # Subtracting the (detached) row max is the published numerical guard; it
        # leaves the log-softmax unchanged.
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        log_prob = F.log_softmax(logits, dim=1)
        pos = (a_labels.unsqueeze(1) == b_labels.unsqueeze(0)).to(log_prob.dtype)
        num_pos = pos.sum(dim=1)
        has_pos = num_pos > 0
        mean_log_prob_pos = (pos * log_prob).sum(dim=1)[has_pos] / num_pos[has_pos]
        return -mean_log_prob_pos.mean()
