"""Self-supervised losses between two augmented views: SimCLR (InfoNCE) and SimSiam."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.dist import gather_with_grad, get_rank

__all__ = ["SimCLRLoss", "SimSiamLoss"]


class SimCLRLoss(nn.Module):
    """SimCLR / NT-Xent loss (Chen et al., 2020) in the SLIP formulation.

    For each local row ``a_i`` of view 1 the logits are ``[a_i . b^T, a_i . a^T]`` / T
    with the self-similarity ``a_i . a_i`` masked out; the positive is ``b_i``. The same
    for view 2 with the roles swapped; the loss is the mean of the two cross-entropies.
    Under DDP both views are gathered from all ranks with gradients, so local rows use
    every rank's rows as negatives; local row ``i`` has global index ``rank * N + i``.
    Each rank's loss is the mean over its own rows, so the mean over ranks equals the
    single-process loss on the whole batch. All ranks must use the same local N.
    ``gather=False`` keeps each rank's loss local (for rows that are identical on every rank).
    """

    def __init__(self, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather = gather   # False when every rank holds the same rows (stage-1 prompts)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """outputs: ``{'aug1_embed': (N, d), 'aug2_embed': (N, d)}`` -> scalar loss."""
        a, b = outputs["aug1_embed"], outputs["aug2_embed"]
        with torch.autocast(device_type=a.device.type, enabled=False):  # float32 logits under AMP
            a = F.normalize(a.float(), dim=1)
            b = F.normalize(b.float(), dim=1)
            all_a, all_b = (gather_with_grad(a), gather_with_grad(b)) if self.gather else (a, b)
            n = a.shape[0]
            targets = (get_rank() * n if self.gather else 0) + torch.arange(n, device=a.device)
            self_mask = F.one_hot(targets, all_a.shape[0]).bool()

            def view_loss(q: torch.Tensor, k_other: torch.Tensor, k_same: torch.Tensor) -> torch.Tensor:
                logits_pos = q @ k_other.t() / self.temperature
                logits_self = (q @ k_same.t() / self.temperature).masked_fill(self_mask, float("-inf"))
                return F.cross_entropy(torch.cat([logits_pos, logits_self], dim=1), targets)

            return 0.5 * (view_loss(a, all_b, all_a) + view_loss(b, all_a, all_b))


class SimSiamLoss(nn.Module):
    """SimSiam loss (Chen & He, 2021): negative cosine similarity with stop-gradient.

    loss = -(cos(p1, sg(z2)).mean() + cos(p2, sg(z1)).mean()) / 2, where ``p`` are the
    predictor outputs and ``z`` the projections; no gradient reaches ``z`` through the
    target branch.
    """

    def forward(
        self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
    ) -> torch.Tensor:
        cos_12 = F.cosine_similarity(p1.float(), z2.detach().float(), dim=1).mean()
        cos_21 = F.cosine_similarity(p2.float(), z1.detach().float(), dim=1).mean()
        return -(cos_12 + cos_21) / 2
