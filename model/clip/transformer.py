"""The transformer of CLIP's text tower and of the ViT image tower (OpenAI parameter names).

Batch-first tokens, attention through ``F.scaled_dot_product_attention`` (``is_causal`` for
text); the ViT takes a patch stride, a resized positional embedding and an optional side
embedding on the class token (see :mod:`model.clip.model`).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "QuickGELU", "MultiheadSelfAttention", "ResidualAttentionBlock", "Transformer",
           "resize_pos_embed", "VisionTransformer"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype (fp16-safe)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        return torch.sigmoid(x * 1.702).mul_(x)  # inference: one temporary fewer


class MultiheadSelfAttention(nn.Module):
    """Batch-first multi-head self-attention on ``F.scaled_dot_product_attention``.

    Parameters are named and initialised like ``nn.MultiheadAttention``'s
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so OpenAI weights load as-is.
    """

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a QuickGELU MLP."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads, causal)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on batch-first (N, L, D) tokens; causal for text."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


def resize_pos_embed(
    posemb: torch.Tensor,
    grid: tuple[int, int],
    src_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize a (1 + Hs*Ws, C) positional embedding to (1 + H*W, C).

    Entry 0 (class token / pooled token) is kept; the grid part is resized with
    bilinear interpolation (align_corners=False), as CLIP-ReID does. ``src_grid``
    defaults to the square grid of a pretrained CLIP embedding, or to ``grid`` itself
    when the length already matches a non-square target grid. Computed in float32.
    """
    tokens = posemb.shape[0] - 1
    if src_grid is None:
        side = math.isqrt(tokens)
        if side * side == tokens:
            src_grid = (side, side)
        elif tokens == grid[0] * grid[1]:
            src_grid = tuple(grid)
        else:
            raise ValueError(
                f"cannot infer the grid of a positional embedding with {tokens} grid entries "
                f"(neither square nor {grid[0]}x{grid[1]}); pass src_grid")
    if src_grid[0] * src_grid[1] != tokens:
        raise ValueError(f"positional embedding has {tokens} grid entries, not {src_grid[0]}x{src_grid[1]}")
    cls_pos, grid_pos = posemb[:1], posemb[1:].float()
    grid_pos = grid_pos.reshape(1, src_grid[0], src_grid[1], -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=tuple(grid), mode="bilinear", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([cls_pos, grid_pos.to(posemb.dtype)], dim=0)


# ---------------------------------------------------------------------------------------
# Image towers
# ---------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """CLIP ViT with a strided patch embedding and an (h_resolution x w_resolution) token grid.

    ``forward(x, cv_emb)`` returns batch-first token tensors ``(x11, x12, xproj)``: the
    tokens after all blocks but the last, after the last block and ``ln_post``, and
    ``x12 @ proj``. Index 0 along the token axis is the class token.
    """

    def __init__(
        self,
        h_resolution: int,
        w_resolution: int,
        patch_size: int,
        stride_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        init_grid: int,
    ):
        super().__init__()
        self.grid_size = (h_resolution, w_resolution)
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=stride_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        # Random init as OpenAI's on the pretrained grid, then resized like a pretrained one.
        pos = scale * torch.randn(init_grid * init_grid + 1, width)
        self.positional_embedding = nn.Parameter(resize_pos_embed(pos, self.grid_size, (init_grid, init_grid)))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(
        self, x: torch.Tensor, cv_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (N, C, h, w)
        if tuple(x.shape[-2:]) != self.grid_size:
            raise ValueError(
                f"input {tuple(x.shape)} gives a {x.shape[-2]}x{x.shape[-1]} patch grid, "
                f"but the model was built for {self.grid_size[0]}x{self.grid_size[1]}")
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if cv_emb is not None:  # SIE: side information goes into the class token only
            cls = cls + cv_emb.to(x.dtype).unsqueeze(1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x11 = self.transformer.resblocks[:-1](x)
        x12 = self.ln_post(self.transformer.resblocks[-1](x11))
        return x11, x12, x12 @ self.proj.to(x12.dtype)
