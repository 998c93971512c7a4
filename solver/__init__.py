"""Optimisers and learning-rate schedulers for stage 1 (prompts) and stage 2 (image encoder)."""
from .lr_scheduler import WarmupMultiStepLR, warmup_multistep_factor
from .make_optimizer import (
    build_optimizer,
    group_params,
    make_optimizer_1stage,
    make_optimizer_2stage,
    rescale_center_grad,
)
from .scheduler_factory import create_scheduler, create_warmup_multistep

__all__ = [
    "WarmupMultiStepLR",
    "build_optimizer",
    "create_scheduler",
    "create_warmup_multistep",
    "group_params",
    "make_optimizer_1stage",
    "make_optimizer_2stage",
    "rescale_center_grad",
    "warmup_multistep_factor",
]
