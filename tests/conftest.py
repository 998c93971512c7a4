"""Test set-up: the repo root on sys.path, quiet progress bars, few threads."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("SVLLREID_NO_TQDM", "1")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A tiny synthetic Market-format set (8 train ids, 4 test ids, 64x32 images)."""
    from datasets.synthetic import SyntheticSpec, generate_synthetic
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate_synthetic(root, SyntheticSpec(num_train_ids=8, num_test_ids=4, num_cams=2, images_per_cam=2,
                                           query_cams=1, num_distractors=2, num_junk=1, height=64, width=32,
                                           seed=3))
    return root
