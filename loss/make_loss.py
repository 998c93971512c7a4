"""Stage-2 ReID objective assembled from the config, plus the SSL loss factory."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .center_loss import CenterLoss
from .softmax_loss import CrossEntropyLabelSmooth
from .ssl_loss import SimCLRLoss, SimSiamLoss
from .triplet_loss import TripletLoss

__all__ = ["make_loss", "make_id_loss", "make_ssl_loss", "LossFunc"]

TensorOrList = torch.Tensor | Sequence[torch.Tensor]
# loss_func(score, feat, target, target_cam=None, i2tscore=None) -> (total, parts)
LossFunc = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _as_list(x: TensorOrList, what: str) -> list[torch.Tensor]:
    """A single tensor becomes a one-element list; an empty list is an error."""
    items = [x] if isinstance(x, torch.Tensor) else list(x)
    if not items:
        raise ValueError(f"make_loss: got an empty list of {what}")
    return items


def make_id_loss(cfg, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Label-smoothed CE (eps 0.1) when MODEL.IF_LABELSMOOTH is 'on', plain CE when 'off'."""
    if cfg.MODEL.IF_LABELSMOOTH == "on":
        return CrossEntropyLabelSmooth(num_classes=num_classes, epsilon=0.1)
    return lambda score, target: F.cross_entropy(score.float(), target)


def make_loss(
    cfg, num_classes: int, feat_dim: int | None = None
) -> tuple[LossFunc, CenterLoss | None]:
    """Build the stage-2 loss function and (for 'triplet_center') the center loss module.

    ``loss_func(score, feat, target, target_cam=None, i2tscore=None)`` returns
    ``(total, parts)``:

    - ``score``: classifier logits, a tensor or a list of tensors; ID = sum of the ID
      loss over the list.
    - ``feat``: features, a tensor or a list; TRI = sum of batch-hard triplet losses
      (margin SOLVER.MARGIN, soft margin when MODEL.NO_MARGIN) over the list.
    - total = ID_LOSS_WEIGHT * ID + TRIPLET_LOSS_WEIGHT * TRI
      (+ I2T_LOSS_WEIGHT * ID-loss(i2tscore, target) when ``i2tscore`` is given)
      (+ SOLVER.STAGE2.CENTER_LOSS_WEIGHT * center(feat[0], target) when
      MODEL.METRIC_LOSS_TYPE is 'triplet_center'; the center loss uses the *first*
      feature of the list, whose width must be ``feat_dim``).
    - ``parts``: the unweighted terms, detached, for logging: keys 'id', 'tri' and,
      when present, 'i2t' and 'center'.

    ``target_cam`` is accepted for interface compatibility and unused. The SSL term is
    added by the trainer (see ``make_ssl_loss``). DATALOADER.SAMPLER is not consulted.
    """
    id_loss = make_id_loss(cfg, num_classes)
    triplet = TripletLoss(margin=None if cfg.MODEL.NO_MARGIN else cfg.SOLVER.MARGIN)
    center_criterion: CenterLoss | None = None
    if cfg.MODEL.METRIC_LOSS_TYPE == "triplet_center":
        if feat_dim is None:
            raise ValueError("make_loss: METRIC_LOSS_TYPE 'triplet_center' needs feat_dim (width of feat[0])")
        center_criterion = CenterLoss(num_classes=num_classes, feat_dim=feat_dim)

    w_id = cfg.MODEL.ID_LOSS_WEIGHT
    w_tri = cfg.MODEL.TRIPLET_LOSS_WEIGHT
    w_i2t = cfg.MODEL.I2T_LOSS_WEIGHT
    w_center = cfg.SOLVER.STAGE2.CENTER_LOSS_WEIGHT

    def loss_func(
        score: TensorOrList,
        feat: TensorOrList,
        target: torch.Tensor,
        target_cam: torch.Tensor | None = None,
        i2tscore: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = _as_list(feat, "features")
        parts = {
            "id": sum(id_loss(s, target) for s in _as_list(score, "scores")),
            "tri": sum(triplet(f, target)[0] for f in feats),
        }
        total = w_id * parts["id"] + w_tri * parts["tri"]
        if i2tscore is not None:
            parts["i2t"] = id_loss(i2tscore, target)
            total = total + w_i2t * parts["i2t"]
        if center_criterion is not None:
            parts["center"] = center_criterion(feats[0], target)
            total = total + w_center * parts["center"]
        return total, {k: v.detach() for k, v in parts.items()}

    return loss_func, center_criterion


def make_ssl_loss(cfg) -> nn.Module:
    """SimCLRLoss(MODEL.SSL_TEMPERATURE) or SimSiamLoss() according to MODEL.SSL_TYPE.

    Note the call signatures differ: SimCLR takes ``{'aug1_embed', 'aug2_embed'}``,
    SimSiam takes ``(p1, p2, z1, z2)``.
    """
    if cfg.MODEL.SSL_TYPE == "SIMCLR":
        return SimCLRLoss(temperature=cfg.MODEL.SSL_TEMPERATURE)
    if cfg.MODEL.SSL_TYPE == "SIMSIAM":
        return SimSiamLoss()
    raise ValueError(f"MODEL.SSL_TYPE {cfg.MODEL.SSL_TYPE!r} not in ('SIMCLR', 'SIMSIAM')")
