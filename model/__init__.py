"""SVLL-ReID model: ``make_model(cfg, num_class, camera_num, view_num)``."""
from .make_model import SVLLReID, augment_prompts, make_model

__all__ = ["SVLLReID", "augment_prompts", "make_model"]
