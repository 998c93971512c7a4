"""SVLL-ReID model: ``make_model(cfg, num_class, camera_num, view_num)`` for training,
``load_for_inference(cfg, test_dataset)`` for evaluation from a weights file alone.
``model_options_from_cfg`` is the one place config keys become ``SVLLReID`` options."""
from .loading import checkpoint_metadata, load_for_inference
from .make_model import SVLLReID, SVLLReIDOptions, augment_prompts, make_model, model_options_from_cfg, move_model

__all__ = ["SVLLReID", "SVLLReIDOptions", "augment_prompts", "checkpoint_metadata", "load_for_inference",
           "make_model", "model_options_from_cfg", "move_model"]
