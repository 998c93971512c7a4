"""Identity classification loss with label smoothing (Szegedy et al., 2016)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CrossEntropyLabelSmooth"]


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against smoothed targets ``(1 - eps) * onehot + eps / num_classes``.

    loss = mean over the batch of ``sum_k -target_k * log_softmax(x)_k``. Logits are
    cast to float32 so the loss is AMP-safe.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """inputs: (B, num_classes) logits; targets: (B,) class indices."""
        log_probs = F.log_softmax(inputs.float(), dim=1)
        onehot = F.one_hot(targets.long(), self.num_classes).to(log_probs.dtype)
        smoothed = (1.0 - self.epsilon) * onehot + self.epsilon / self.num_classes
        return (-smoothed * log_probs).mean(0).sum()
