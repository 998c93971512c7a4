"""The heads on the CLIP features: BNNeck and classifier initialisation, the SSL projection and
prediction MLPs (sub-module names as published, so state dicts stay interchangeable)."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

__all__ = ["init_bn_neck", "init_classifier", "init_image_ssl_head", "projection_mlp", "prediction_mlp"]


def init_bn_neck(bn: nn.BatchNorm1d) -> None:
    """BNNeck: weight 1, bias 0 and frozen."""
    nn.init.constant_(bn.weight, 1.0)
    nn.init.constant_(bn.bias, 0.0)
    bn.bias.requires_grad_(False)  # BNNeck: bias frozen


def init_classifier(fc: nn.Linear) -> None:
    """ID classifier: normal weights with std 0.001."""
    nn.init.normal_(fc.weight, std=0.001)


def init_image_ssl_head(module: nn.Module) -> None:
    """The published initialisation of the image SSL head: Kaiming (fan-in) Linear weights and
    BatchNorm weight and bias drawn uniformly from [0, 1). Linear biases keep PyTorch's default.

    Only the image head gets it; the text head keeps PyTorch's default initialisation, as published
    (it does not train in stage 1 by default, so its initialisation fixes the language-SSL objective).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.uniform_(m.weight)
            nn.init.uniform_(m.bias)


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR projection head: Linear-BN-ReLU, Linear-BN-ReLU, Linear.

    Sub-modules carry the published names (``layer1, bn1, relu1, layer2, bn2, relu2, layer3``)
    so that state dicts are interchangeable with the published SVLL-ReID code. PyTorch's default
    initialisation; the model applies :func:`init_image_ssl_head` to the image head.
    """
    mlp = nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(in_dim, hidden_dim)), ("bn1", nn.BatchNorm1d(hidden_dim)),
        ("relu1", nn.ReLU(inplace=True)),
        ("layer2", nn.Linear(hidden_dim, hidden_dim)), ("bn2", nn.BatchNorm1d(hidden_dim)),
        ("relu2", nn.ReLU(inplace=True)),
        ("layer3", nn.Linear(hidden_dim, out_dim)),
    ]))
    return mlp


def prediction_mlp(dim: int, hidden_dim: int = 512) -> nn.Sequential:
    """SimSiam predictor: Linear-BN-ReLU-Linear (dim -> hidden -> dim), published names
    ``linear1, bn1, relu1, layer2``; PyTorch's default initialisation until the model applies
    :func:`init_image_ssl_head`."""
    mlp = nn.Sequential(OrderedDict([
        ("linear1", nn.Linear(dim, hidden_dim)), ("bn1", nn.BatchNorm1d(hidden_dim)), ("relu1", nn.ReLU(inplace=True)),
        ("layer2", nn.Linear(hidden_dim, dim)),
    ]))
    return mlp
