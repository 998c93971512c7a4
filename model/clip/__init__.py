"""CLIP backbone (OpenAI architecture with the ReID changes), tokenizer and weight loading."""
from .loader import load_clip, load_state_dict, resolve_checkpoint
from .model import (
    ARCHITECTURES,
    CLIP,
    CLIPArch,
    ModifiedResNet,
    TextTower,
    Transformer,
    VisionTransformer,
    arch_from_state_dict,
    build_model,
    build_random_clip,
    convert_weights_fp16,
    count_blocks,
    resize_pos_embed,
    vision_tower_arch,
)
from .tokenizer import SimpleTokenizer, tokenize

__all__ = [
    "ARCHITECTURES", "CLIP", "CLIPArch", "ModifiedResNet", "SimpleTokenizer", "TextTower", "Transformer",
    "VisionTransformer", "arch_from_state_dict", "build_model", "build_random_clip", "convert_weights_fp16",
    "count_blocks", "load_clip", "load_state_dict", "resize_pos_embed", "resolve_checkpoint", "tokenize",
    "vision_tower_arch",
]
