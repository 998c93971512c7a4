"""Test set-up: the repo root on sys.path, quiet progress bars, few threads."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("SVLLREID_NO_TQDM", "1")
