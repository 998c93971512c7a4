"""Training loops (stage 1, stage 2) and benchmark evaluation."""
from .inference import Evaluation, do_inference, evaluate_loader, extract_features
from .processor_stage1 import do_train_stage1
from .processor_stage2 import Stage2Criteria, do_train_stage2

__all__ = ["Evaluation", "do_inference", "evaluate_loader", "extract_features", "do_train_stage1", "do_train_stage2",
           "Stage2Criteria"]
