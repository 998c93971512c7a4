"""CLIP's modified ResNet image tower (RN50), with layer4 at stride 1 for ReID (OpenAI parameter names)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import resize_pos_embed

__all__ = ["Bottleneck", "AttentionPool2d", "ModifiedResNet"]


class Bottleneck(nn.Module):
    """Anti-aliased ResNet bottleneck: strided blocks average-pool instead of striding the conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys "0"/"1" as in OpenAI's checkpoints; the pool ("-1") has no weights.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention over [mean token, grid tokens] of a feature map; returns all output tokens."""

    def __init__(self, grid: tuple[int, int], embed_dim: int, heads: int, output_dim: int, init_grid: int):
        super().__init__()
        self.grid_size = tuple(grid)
        self.heads = heads
        pos = torch.randn(init_grid * init_grid + 1, embed_dim) / embed_dim ** 0.5
        self.positional_embedding = nn.Parameter(resize_pos_embed(pos, self.grid_size, (init_grid, init_grid)))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        return x.view(n, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) map -> (N, 1 + H*W, output_dim) tokens; token 0 is the pooled embedding."""
        if x.shape[-2] * x.shape[-1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"feature map {x.shape[-2]}x{x.shape[-1]} does not match the attention-pool grid "
                f"{self.grid_size[0]}x{self.grid_size[1]}")
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).flatten(2))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet (3-conv stem, anti-aliased bottlenecks, attention pool), layer4 stride 1.

    ``forward(x, cv_emb)`` returns ``(layer3 map, layer4 map, attention-pool tokens)``;
    ``cv_emb`` is accepted for interface symmetry with the ViT and ignored.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        output_dim: int,
        heads: int,
        width: int,
        h_resolution: int,
        w_resolution: int,
        init_grid: int,
    ):
        super().__init__()
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)

        inplanes = width
        stages = []
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 1))):  # layer4 stride 1 (ReID)
            planes = width * 2 ** i
            stages.append(nn.Sequential(
                Bottleneck(inplanes, planes, stride),
                *[Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)],
            ))
            inplanes = planes * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d((h_resolution, w_resolution), width * 32, heads, output_dim, init_grid)
        self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI's init: attention-pool projections N(0, C^-1/2), last BN of every block zeroed."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.relu(bn(conv(x)))
        return self.avgpool(x)

    def forward(
        self, x: torch.Tensor, cv_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x.to(self.conv1.weight.dtype))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        x4 = self.layer4(x3)
        return x3, x4, self.attnpool(x4)
