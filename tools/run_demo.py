"""Demo: evaluate the untrained model, train both stages, evaluate again (with pictures), show the files.

    python tools/run_demo.py --config_file configs/demo/vit_svllreid_demo.yml [KEY VALUE ...]

Used by ``make demo`` on the synthetic set (``tools/make_synthetic.py``). The numbers it
prints are exactly what the evaluation computed. Writes demo_results.json, the training
record (metrics.jsonl, tensorboard/, curves.png) and, with TEST.VISUALIZE, eval/visualize/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from test_svllreid import evaluate  # noqa: E402
from train_svllreid import train  # noqa: E402
from utils import cli  # noqa: E402
from utils.misc import write_json_atomic  # noqa: E402
from utils.record import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config_file", default="configs/demo/vit_svllreid_demo.yml")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = cli.parse_with_overrides(p)
    cfg = load_config(args.config_file, args.opts)
    t0 = time.time()
    out = train(cfg, evaluate_untrained=True, overwrite=True)   # a new demo replaces the last one
    elapsed = time.time() - t0
    path = os.path.join(cfg.OUTPUT_DIR, "demo_results.json")
    write_json_atomic(path, {"untrained": out["untrained"], "trained": out["trained"], "seconds": round(elapsed, 1)})
    u, t = out["untrained"], out["trained"]
    print(f"\n{'':10s} {'mAP':>7s} {'Rank-1':>7s} {'Rank-5':>7s} {'mINP':>7s}")
    for name, r in (("untrained", u), ("trained", t)):
        print(f"{name:10s} {100 * r['mAP']:6.1f}% {100 * r['cmc'][0]:6.1f}% {100 * r['cmc'][4]:6.1f}% "
              f"{100 * r['mINP']:6.1f}%")
    print(f"trained / untrained mAP: {t['mAP'] / max(u['mAP'], 1e-12):.2f}x   ({elapsed:.0f} s)   -> {path}")

    out = cfg.OUTPUT_DIR
    weight = os.path.join(out, f"{cfg.MODEL.NAME}_{cfg.SOLVER.STAGE2.MAX_EPOCHS}.pth")
    vis = None
    if cfg.TEST.VISUALIZE and os.path.isfile(weight):   # the evaluation pictures of the trained model
        ecfg = load_config(args.config_file, list(args.opts) + ["TEST.WEIGHT", weight])
        evaluate(ecfg, output_dir=os.path.join(out, "eval"))
        vis = os.path.join(out, "eval", "visualize")
    print("\nFiles of this run:")
    print(f"  training record   {os.path.join(out, METRICS_FILE)}   (one JSON line per log period, epoch, evaluation)")
    print(f"                    {os.path.join(out, CURVES_FILE)}")
    print(f"                    {os.path.join(out, TENSORBOARD_DIR)}/   (tensorboard --logdir {out})")
    if vis:
        print(f"  evaluation        {vis}/cmc.png, worst_*.png, best_*.png (ranked lists)")
    print(f"  checkpoint        {weight}")
    cf, root = args.config_file, cfg.DATASETS.ROOT_DIR
    print("\nUse the model on any images:")
    print(f"  python tools/extract_features.py --config_file {cf} --images {root}/query "
          f"--out {out}/query_features.npz TEST.WEIGHT {weight}")
    print(f"  python tools/search.py --config_file {cf} --query {root}/query --gallery {root}/bounding_box_test "
          f"--topk 10 --out {out}/search TEST.WEIGHT {weight}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
