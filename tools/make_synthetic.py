#!/usr/bin/env python
"""Write the synthetic Market-format ReID set (demo / test data).

    python tools/make_synthetic.py --out data/synthetic [--num-ids 64 --num-test-ids 32
        --num-cams 4 --images-per-cam 4 --seed 0 --overwrite --baseline]

The result is a ``folder`` dataset: DATASETS.NAMES folder DATASETS.ROOT_DIR <out>.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

from datasets.synthetic import SyntheticSpec, SyntheticSpecError, generate_synthetic, pixel_baseline  # noqa: E402
from utils import cli  # noqa: E402

# SyntheticSpec field -> the flag that sets it (errors name the flag the user typed)
FLAGS = {"num_train_ids": "--num-ids", "num_test_ids": "--num-test-ids", "num_cams": "--num-cams",
         "images_per_cam": "--images-per-cam", "query_cams": "--query-cams",
         "num_distractors": "--num-distractors", "num_junk": "--num-junk", "height": "--height",
         "width": "--width", "seed": "--seed"}


def main(argv: list[str] | None = None) -> int:
    d = SyntheticSpec()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="data/synthetic", help="output folder")
    ap.add_argument("--num-ids", type=int, default=d.num_train_ids, help="training identities")
    ap.add_argument("--num-test-ids", type=int, default=d.num_test_ids, help="test identities")
    ap.add_argument("--num-cams", type=int, default=d.num_cams)
    ap.add_argument("--images-per-cam", type=int, default=d.images_per_cam,
                    help="images per identity per camera")
    ap.add_argument("--query-cams", type=int, default=d.query_cams,
                    help="cameras per test identity that give one query image")
    ap.add_argument("--num-distractors", type=int, default=d.num_distractors)
    ap.add_argument("--num-junk", type=int, default=d.num_junk)
    ap.add_argument("--height", type=int, default=d.height)
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing set")
    ap.add_argument("--baseline", action="store_true",
                    help="print the raw-pixel (16x8) mAP and an identity-oracle mAP")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = SyntheticSpec(
            num_train_ids=args.num_ids, num_test_ids=args.num_test_ids, num_cams=args.num_cams,
            images_per_cam=args.images_per_cam, query_cams=args.query_cams,
            num_distractors=args.num_distractors, num_junk=args.num_junk, height=args.height,
            width=args.width, seed=args.seed)
    except SyntheticSpecError as e:
        print(f"error: {FLAGS.get(e.field, e.field)} {e.value}: {e.expected}", file=sys.stderr)
        return 2
    code = 0

    def run() -> None:
        nonlocal code
        t0 = time.perf_counter()
        try:
            counts = generate_synthetic(args.out, spec, overwrite=args.overwrite)
        except FileExistsError as e:     # an existing set kept: exit code 1, as always
            print(f"error: {e}", file=sys.stderr)
            code = 1
            return
        print(f"wrote {sum(counts.values())} images to {args.out} in {time.perf_counter() - t0:.1f}s "
              f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
        if args.baseline:
            for k, v in pixel_baseline(args.out).items():
                print(f"{k}: {v:.3f}")

    def interrupted() -> str:
        return f"the set in {args.out} is incomplete; run the same command with --overwrite to write it again"

    return cli.run(run, on_interrupt=interrupted) or code


if __name__ == "__main__":
    sys.exit(main())
