"""OpenAI CLIP with the ReID changes used by CLIP-ReID / SVLL-ReID.

Parameter names follow OpenAI's released ``.pt`` files (and open_clip's ``ViT-B-16`` /
``RN50``), so their state dicts load as they are. Differences from OpenAI CLIP:

* ViT: the patch convolution takes a stride (overlapping patches), the positional
  embedding is bilinearly resized to the new patch grid, an optional side embedding
  (SIE) is added to the class token, and the forward returns token tensors after
  block L-1, after block L + ``ln_post``, and their projection by ``proj``.
* ModifiedResNet: layer4 has stride 1, the attention-pool positional embedding is
  resized to the feature-map grid, and the forward returns the layer3 and layer4 maps
  and all attention-pool output tokens (index 0 is CLIP's pooled embedding).
* Transformers are batch-first and attention runs through
  ``F.scaled_dot_product_attention`` (``is_causal`` for text; no mask tensor).

Weights stay float32 (use autocast on CUDA); ``convert_weights_fp16`` is for CUDA
inference only. Parity with open_clip is tested in ``tests/test_clip_parity.py``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLIP", "CLIPArch", "ARCHITECTURES", "VisionTransformer", "ModifiedResNet", "Transformer",
    "build_model", "build_random_clip", "convert_weights_fp16", "resize_pos_embed", "arch_from_state_dict",
]

logger = logging.getLogger("svllreid.clip")

PRETRAINED_IMAGE_SIZE = 224  # OpenAI CLIP's training resolution: sets the grid of the pretrained pos-embeddings
RESNET_STRIDE = 32  # ModifiedResNet output stride with the original layer4 (stride 2)
# Keys some checkpoints carry that are not model weights.
_IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size", "logit_scale", "logit_bias"}


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------
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
    grid: Tuple[int, int],
    src_grid: Optional[Tuple[int, int]] = None,
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
        self, x: torch.Tensor, cv_emb: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        self.downsample: Optional[nn.Module] = None
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

    def __init__(self, grid: Tuple[int, int], embed_dim: int, heads: int, output_dim: int, init_grid: int):
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
        layers: Tuple[int, int, int, int],
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
        self, x: torch.Tensor, cv_emb: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x.to(self.conv1.weight.dtype))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        x4 = self.layer4(x3)
        return x3, x4, self.attnpool(x4)


# ---------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CLIPArch:
    """Hyper-parameters of a CLIP model (what OpenAI's ``build_model`` infers from weights).

    ``vision_layers`` is the ViT depth (int) or the ResNet blocks per stage (4-tuple);
    ``vision_width`` is the ViT width or the ResNet stem width; ``vision_patch_size`` is 0
    for ResNets.
    """

    embed_dim: int
    vision_layers: Union[int, Tuple[int, int, int, int]]
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    text_width: int
    text_heads: int
    text_layers: int
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def is_vit(self) -> bool:
        return isinstance(self.vision_layers, int)


ARCHITECTURES: Dict[str, CLIPArch] = {
    "ViT-B-16": CLIPArch(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16,
                         vision_heads=12, text_width=512, text_heads=8, text_layers=12),
    "RN50": CLIPArch(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=0,
                     vision_heads=32, text_width=512, text_heads=8, text_layers=12),
}


def _default_heads(width: int) -> int:
    """OpenAI's rule: one head per 64 channels (at least one)."""
    return max(1, width // 64)


class TextTower:
    """The text path after the token embedding, shared by CLIP and the ReID model's text encoder.

    Needs ``positional_embedding``, ``transformer``, ``ln_final`` and ``text_projection``.
    """
    positional_embedding: nn.Parameter
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Parameter

    def encode_token_embeddings(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features from token embeddings ``x`` (N, L, width): + positional embedding,
        causal transformer, ``ln_final`` and ``text_projection`` at the end-of-text position
        ``tokens.argmax(-1)``. Prompt learners pass embeddings with learnable slots."""
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return self.ln_final(x) @ self.text_projection.to(x.dtype)


class CLIP(TextTower, nn.Module):
    """CLIP image tower (``visual``) and causal text transformer.

    ``image_feature_dims`` = (dim of x11 CLS / layer3, dim of x12 CLS / layer4, embed_dim).
    ``vision_width`` is the architecture parameter (ResNet: the stem width), not a feature size.
    """

    def __init__(self, arch: CLIPArch, h_resolution: int, w_resolution: int, vision_stride_size: int):
        super().__init__()
        self.arch = arch
        self.embed_dim = arch.embed_dim
        self.vision_width = arch.vision_width
        self.context_length = arch.context_length
        self.visual: Union[VisionTransformer, ModifiedResNet]
        if arch.is_vit:
            self.visual = VisionTransformer(
                h_resolution, w_resolution, arch.vision_patch_size, vision_stride_size, arch.vision_width,
                arch.vision_layers, arch.vision_heads, arch.embed_dim,
                init_grid=PRETRAINED_IMAGE_SIZE // arch.vision_patch_size)
            self.image_feature_dims = (arch.vision_width, arch.vision_width, arch.embed_dim)
        else:
            self.visual = ModifiedResNet(
                arch.vision_layers, arch.embed_dim, arch.vision_heads, arch.vision_width, h_resolution,
                w_resolution, init_grid=PRETRAINED_IMAGE_SIZE // RESNET_STRIDE)
            self.image_feature_dims = (arch.vision_width * 16, arch.vision_width * 32, arch.embed_dim)

        self.transformer = Transformer(arch.text_width, arch.text_layers, arch.text_heads, causal=True)
        self.token_embedding = nn.Embedding(arch.vocab_size, arch.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(arch.context_length, arch.text_width))
        self.ln_final = LayerNorm(arch.text_width)
        self.text_projection = nn.Parameter(torch.empty(arch.text_width, arch.embed_dim))
        self.init_text_parameters()

    def init_text_parameters(self) -> None:
        """OpenAI's text-tower init (depth-scaled normal init of the residual projections)."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor, cv_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Projected image embedding (N, embed_dim): CLIP's ``encode_image`` (ViT: projected
        class token; ResNet: attention-pooled token), on this model's grid / stride."""
        return self.visual(image, cv_emb)[2][:, 0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP text embedding (N, embed_dim) of tokenized text (N, context_length)."""
        return self.encode_token_embeddings(self.token_embedding(tokens).to(self.dtype), tokens)


# ---------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------
def vision_tower_arch(state_dict: Mapping[str, torch.Tensor], prefix: str
                      ) -> tuple[int, Union[int, Tuple[int, ...]], int, int]:
    """(width, layers, patch size, heads) of the image tower whose keys start with ``prefix``
    (OpenAI names under it): a ViT when it has a class embedding, else a ModifiedResNet
    (width = stem width, layers = blocks per stage, patch size 0)."""
    if f"{prefix}class_embedding" in state_dict:
        width = int(state_dict[f"{prefix}conv1.weight"].shape[0])
        return (width, count_blocks(state_dict, f"{prefix}transformer.resblocks."),
                int(state_dict[f"{prefix}conv1.weight"].shape[-1]), _default_heads(width))
    width = int(state_dict[f"{prefix}layer1.0.conv1.weight"].shape[0])
    return width, tuple(count_blocks(state_dict, f"{prefix}layer{i}.") for i in range(1, 5)), 0, \
        _default_heads(width * 32)


def count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered blocks (``<prefix>0.``, ``<prefix>1.``, ...) in a state dict."""
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def arch_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> CLIPArch:
    """Infer the architecture from OpenAI-format weights (as OpenAI's ``build_model`` does)."""
    required = ["visual.conv1.weight", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight"]
    vit = "visual.proj" in state_dict
    required.append("visual.class_embedding" if vit else "visual.layer1.0.conv1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not an OpenAI-format CLIP state dict: missing keys {missing} "
                         f"(found e.g. {sorted(state_dict)[:5]})")
    vision_width, vision_layers, patch_size, vision_heads = vision_tower_arch(state_dict, "visual.")
    text_width = state_dict["ln_final.weight"].shape[0]
    return CLIPArch(
        embed_dim=state_dict["text_projection"].shape[1],
        vision_layers=vision_layers,  # type: ignore[arg-type]
        vision_width=vision_width,
        vision_patch_size=patch_size,
        vision_heads=vision_heads,
        text_width=text_width,
        text_heads=_default_heads(text_width),
        text_layers=count_blocks(state_dict, "transformer.resblocks."),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
    )


def _is_ignored(key: str) -> bool:
    return key in _IGNORED_KEYS or key.endswith("attn_mask")


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    h_resolution: int,
    w_resolution: int,
    vision_stride_size: int,
    *,
    text_heads: int = 0,
    vision_heads: int = 0,
) -> CLIP:
    """Build CLIP from OpenAI-format weights, resizing the image positional embedding.

    ``(h_resolution, w_resolution)`` is the token grid: for the ViT
    ((H - patch) // stride + 1, (W - patch) // stride + 1); for the ResNet (H // 16, W // 16)
    (layer4 has stride 1). ``vision_stride_size`` is ignored for the ResNet. Head counts
    are not stored in weights; they default to width // 64 as in OpenAI CLIP. Weights are
    float32; the model is returned in eval mode. Missing, unexpected or mis-shaped keys
    raise ``ValueError`` listing them.
    """
    state_dict = {k: v for k, v in state_dict.items() if not _is_ignored(k)}
    arch = arch_from_state_dict(state_dict)
    arch = dataclasses.replace(arch, text_heads=text_heads or arch.text_heads,
                               vision_heads=vision_heads or arch.vision_heads)
    with torch.device("meta"):  # no random init (fast, leaves the global RNG alone)
        model = CLIP(arch, h_resolution, w_resolution, vision_stride_size)

    pos_key = "visual.positional_embedding" if arch.is_vit else "visual.attnpool.positional_embedding"
    state_dict[pos_key] = resize_pos_embed(state_dict[pos_key], (h_resolution, w_resolution))

    expected = model.state_dict()
    absent = [k for k in expected if k not in state_dict]
    missing_ok = [k for k in absent if k.endswith("num_batches_tracked")]
    missing = [k for k in absent if k not in missing_ok]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            "CLIP state dict does not match the architecture inferred from it "
            f"({'ViT' if arch.is_vit else 'ResNet'}):\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}")
    model = model.to_empty(device="cpu")
    for key in missing_ok:  # OpenAI's ResNet archives may lack the BN step counters
        state_dict[key] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def build_random_clip(
    name: str,
    h_resolution: int,
    w_resolution: int,
    vision_stride_size: int,
    embed_dim: int = 0,
    vision_width: int = 0,
    vision_layers: int = 0,
    vision_patch_size: int = 0,
    text_width: int = 0,
    text_heads: int = 0,
    text_layers: int = 0,
) -> CLIP:
    """A randomly initialised CLIP of a named architecture ('ViT-B-16' or 'RN50').

    Zero arguments keep the named value; for RN50 ``vision_layers=n`` means (n, n, n, n)
    blocks and ``vision_width`` is the stem width. Head counts follow width // 64 unless
    ``text_heads`` is given. Vocabulary (49,408) and context (77) are kept so the real
    tokenizer works. Initialisation follows OpenAI / open_clip; positional embeddings are
    drawn on the 224-px grid and resized like pretrained ones.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown CLIP architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    width = vision_width or arch.vision_width
    layers = arch.vision_layers
    if vision_layers:
        layers = vision_layers if arch.is_vit else (vision_layers,) * 4
    arch = dataclasses.replace(
        arch,
        embed_dim=embed_dim or arch.embed_dim,
        vision_layers=layers,
        vision_width=width,
        vision_patch_size=vision_patch_size or arch.vision_patch_size,
        vision_heads=_default_heads(width if arch.is_vit else width * 32),
        text_width=text_width or arch.text_width,
        text_heads=text_heads or _default_heads(text_width or arch.text_width),
        text_layers=text_layers or arch.text_layers,
    )
    logger.warning("Building CLIP %s with RANDOM weights (no pretrained checkpoint): %s", name, arch)
    return CLIP(arch, h_resolution, w_resolution, vision_stride_size)


def convert_weights_fp16(model: nn.Module) -> nn.Module:
    """Cast all parameters except normalisation layers to float16, in place.

    For CUDA inference only (training keeps float32 weights under autocast). LayerNorms
    compute in float32 internally; BatchNorm keeps float32 affine parameters and statistics.
    """
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.half()
    return model
