"""Features of every image under a folder, as the evaluation computes them, into one .npz.

    python tools/extract_features.py --config_file configs/demo/vit_svllreid_demo.yml \\
        --images DIR --out feats.npz TEST.WEIGHT output/demo/ViT-B-16_40.pth [KEY VALUE ...]

The checkpoint is TEST.WEIGHT; images are read recursively (any mode or size Pillow opens)
and go through the test transform. The file holds ``features`` (N x D float32, not
normalised: the evaluation normalises when TEST.FEAT_NORM is yes), ``paths`` (relative to
DIR), ``pids`` / ``camids`` from names such as ``0002_c1s1_000451_03.jpg`` (else -1),
``failed`` (unreadable files, also listed at the end), ``root`` and ``meta`` (JSON).
A model trained with camera side information (MODEL.SIE_CAMERA) uses the camera of the name,
else ``--camera N``, else none (with a warning: such features are less comparable).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

from processor.folder_inference import extract_folder, list_image_files
from tools._common import camera_id, load_model, setup
from utils import cli

logger = logging.getLogger("svllreid")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config_file", default="", help="the YAML config the model was trained with")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--camera", type=int, default=None,
                   help="camera number (c1 = 1) for images whose name has none; used by SIE models")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (TEST.WEIGHT required)")
    return cli.parse_with_overrides(p, argv)


def run(args: argparse.Namespace) -> None:
    camera_id(args.camera)                         # a bad number fails before the model is built
    files = list_image_files(args.images)          # so does a bad folder
    cfg, device = setup(args.config_file, args.opts)
    model, info = load_model(cfg)
    cam = camera_id(args.camera, info)
    fs = extract_folder(cfg, model, info, args.images, device, camera=cam, files=files)
    fs.save(args.out)
    n_lab = int((fs.pids >= 0).sum())
    logger.info("%d images -> %s: features %s, identity and camera parsed from %d names", len(fs.paths), args.out,
                "x".join(map(str, fs.features.shape)), n_lab)
    if fs.failed:
        logger.warning("%d unreadable file(s) skipped (also in the file's 'failed'):\n%s", len(fs.failed),
                       "\n".join(f"  {p}: {r}" for p, r in fs.failed))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: run(args))


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
