"""SVLL-ReID model: ``make_model(cfg, num_class, camera_num, view_num)`` for training,
``load_for_inference(cfg, test_dataset)`` for evaluation from a weights file alone."""
from .loading import checkpoint_metadata, load_for_inference
from .make_model import SVLLReID, augment_prompts, make_model

__all__ = ["SVLLReID", "augment_prompts", "checkpoint_metadata", "load_for_inference", "make_model"]
