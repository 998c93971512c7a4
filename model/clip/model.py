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

The towers' blocks live in :mod:`model.clip.transformer` (text transformer, ViT) and
:mod:`model.clip.modified_resnet` (RN50), as open_clip names them; this module holds the
CLIP model, its architecture and building it from weights.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

# the blocks, re-exported where they were (model.clip.model.ModifiedResNet, ...)
from .modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet  # noqa: F401
from .transformer import (  # noqa: F401  # noqa: F401
    LayerNorm,
    MultiheadSelfAttention,
    QuickGELU,
    ResidualAttentionBlock,
    Transformer,
    VisionTransformer,
    resize_pos_embed,
)

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
    vision_layers: int | tuple[int, int, int, int]
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


ARCHITECTURES: dict[str, CLIPArch] = {
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
        self.visual: VisionTransformer | ModifiedResNet
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

    def encode_image(self, image: torch.Tensor, cv_emb: torch.Tensor | None = None) -> torch.Tensor:
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
                      ) -> tuple[int, int | tuple[int, ...], int, int]:
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


def _first(items: list[str], n: int = 8) -> str:
    """The first ``n`` of ``items`` (a key list of a whole foreign checkpoint would run to hundreds)."""
    return str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


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
            f"  missing keys ({len(missing)}): {_first(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_first(unexpected)}\n"
            f"  shape mismatches ({len(mismatched)}): {_first(mismatched)}")
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
