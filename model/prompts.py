"""The learnable prompts: "A photo of a X X X X person." per identity, their augmentation for
language SSL, and the frozen CLIP text tower that encodes them."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import clip

__all__ = ["VEHICLE_DATASETS", "N_CLS_CTX", "N_PREFIX", "augment_prompts", "PromptLearner", "TextEncoder"]

VEHICLE_DATASETS = ("veri", "VehicleID")
N_CLS_CTX = 4        # learnable identity tokens per prompt ("X X X X")
N_PREFIX = 5         # "<sot> a photo of a"


def augment_prompts(prompts: torch.Tensor, method: str, scale: float) -> torch.Tensor:
    """One augmented copy of a batch of prompt embeddings (B, L, D), vectorised over the batch.

    mask: each element zeroed independently with probability ``scale``;
    swap: per prompt, ``int(scale * L)`` random positions are randomly permuted among themselves;
    mix:  each prompt becomes ``(1 - scale) * itself + scale * another prompt of the batch``
          (the batch rolled by one random shift, as ``torch.roll``).
    """
    b, length, d = prompts.shape
    if method == "mask":
        keep = torch.rand_like(prompts, dtype=torch.float32) >= scale
        return prompts * keep.to(prompts.dtype)
    if method == "swap":
        m = int(scale * length)
        if m < 2:
            return prompts
        pos = torch.rand(b, length, device=prompts.device).argsort(dim=1)[:, :m]        # chosen positions
        perm = torch.rand(b, m, device=prompts.device).argsort(dim=1)
        src = pos.gather(1, perm)                                                        # where each gets its value
        out = prompts.clone()
        out.scatter_(1, pos.unsqueeze(-1).expand(-1, -1, d), prompts.gather(1, src.unsqueeze(-1).expand(-1, -1, d)))
        return out
    if method == "mix":
        if b < 2:
            return prompts
        # prompt i mixes with prompt (i - shift) mod b, shift in [1, b): torch.roll(prompts, shift)
        # with the shift kept on the device (no host read: no sync, no graph break under compile)
        shift = torch.randint(1, b, (1,), device=prompts.device)
        other = prompts[(torch.arange(b, device=prompts.device) - shift) % b]            # another prompt, never itself
        return (1.0 - scale) * prompts + scale * other
    raise ValueError(f"SOLVER.STAGE1.PROMPT_AUG_METHOD = {method!r}; choose 'mask', 'swap' or 'mix'")


class PromptLearner(nn.Module):
    """"A photo of a X X X X person." with the four X learnable per identity (docs/method.md, section 3)."""

    def __init__(self, num_classes: int, dataset_name: str, token_embedding: nn.Embedding) -> None:
        super().__init__()
        noun = "vehicle" if dataset_name in VEHICLE_DATASETS else "person"
        self.template = f"A photo of a {' '.join(['X'] * N_CLS_CTX)} {noun}."
        tokens = clip.tokenize(self.template)                                 # (1, 77)
        with torch.no_grad():
            embedding = token_embedding(tokens.to(token_embedding.weight.device)).float()
        ctx_dim = embedding.shape[-1]
        self.register_buffer("tokenized_prompts", tokens, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :N_PREFIX, :].clone())
        self.register_buffer("token_suffix", embedding[:, N_PREFIX + N_CLS_CTX:, :].clone())
        self.cls_ctx = nn.Parameter(torch.empty(num_classes, N_CLS_CTX, ctx_dim).normal_(std=0.02))

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        """Prompt token embeddings (B, 77, D) for identity labels (B,)."""
        b = label.shape[0]
        return torch.cat([self.token_prefix.expand(b, -1, -1), self.cls_ctx[label],
                          self.token_suffix.expand(b, -1, -1)], dim=1)


class TextEncoder(clip.TextTower, nn.Module):
    """CLIP text tower applied to prompt embeddings (frozen in both stages)."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        return self.encode_token_embeddings(prompts, tokenized_prompts)
