"""A user's own data in the Market naming scheme (also the synthetic demo set's format)."""
from __future__ import annotations

from .market1501 import MarketStyleDataset

__all__ = ["FolderDataset"]


class FolderDataset(MarketStyleDataset):
    """``<root>/{bounding_box_train,query,bounding_box_test}`` with ``PPPP_cC...`` names.

    Camera numbers as written are mapped densely onto ``0..C-1`` (sorted), so both
    1-based (``c1..``) and 0-based (``c0..``) numbering work.
    """

    name = "folder"
    dataset_dir = ""
    dense_cameras = True
    scheme = "PPPP_cC<anything>.jpg|png, e.g. 0002_c1s1_000451_03.jpg"

    @classmethod
    def layout(cls, root: str) -> str:
        return (super().layout(root) + "\n  (a synthetic set in this layout: "
                f"python tools/make_synthetic.py --out {root})")
