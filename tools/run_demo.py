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

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

from config import load_config  # noqa: E402
from processor.position import POSITION  # noqa: E402
from test_svllreid import evaluate  # noqa: E402
from train_svllreid import train  # noqa: E402
from utils import cli  # noqa: E402
from utils.misc import write_json_atomic  # noqa: E402
from utils.run_dir import CONFIG_FILE  # noqa: E402


def results_table(untrained: dict, trained: dict, seconds: float) -> str:
    """The demo's closing table: mAP / Rank-1 / Rank-5 / mINP before and after training, and the time."""
    lines = [f"{'':10s} {'mAP':>7s} {'Rank-1':>7s} {'Rank-5':>7s} {'mINP':>7s}"]
    for name, r in (("untrained", untrained), ("trained", trained)):
        lines.append(f"{name:10s} {100 * r['mAP']:6.1f}% {100 * r['cmc'][0]:6.1f}% {100 * r['cmc'][4]:6.1f}% "
                     f"{100 * r['mINP']:6.1f}%")
    lines.append(f"trained / untrained mAP: {trained['mAP'] / max(untrained['mAP'], 1e-12):.2f}x; "
                 f"the demo took {seconds:.0f} s ({seconds / 60:.1f} min)")
    return "\n".join(lines)


def demo(config_file: str, opts: list[str], output_dir: list[str]) -> None:
    """Train and evaluate as configured, then print the files, the commands and the results table."""
    cfg = load_config(config_file, opts)
    output_dir.append(cfg.OUTPUT_DIR)
    t0 = time.time()
    out = train(cfg, evaluate_untrained=True, overwrite=True)   # a new demo replaces the last one
    elapsed = time.time() - t0
    path = os.path.join(cfg.OUTPUT_DIR, "demo_results.json")
    u, t = out["untrained"], out["trained"]
    write_json_atomic(path, {"untrained": u, "trained": t, "seconds": round(elapsed, 1)})

    out_dir = cfg.OUTPUT_DIR
    weight = os.path.join(out_dir, f"{cfg.MODEL.NAME}_{cfg.SOLVER.STAGE2.MAX_EPOCHS}.pth")
    vis = None
    if cfg.TEST.VISUALIZE and os.path.isfile(weight):   # the evaluation pictures of the trained model
        ecfg = load_config(config_file, list(opts) + ["TEST.WEIGHT", weight])
        evaluate(ecfg, output_dir=os.path.join(out_dir, "eval"))
        vis = os.path.join(out_dir, "eval", "visualize")
    total = time.time() - t0
    # the training's own summary (its last log lines) lists the run's files: only the demo's are added here
    print(f"\nThe demo's files, beside the training's in {out_dir}:")
    print(f"  results           {path}")
    if vis:
        print(f"  evaluation        {vis}/cmc.png, worst_*.png, best_*.png: the ranked lists")
    print(f"  TensorBoard       tensorboard --logdir {out_dir}")
    # the run's saved config carries the overrides too, so the commands run as printed
    py, root, run_cfg = cli.python_command(), cfg.DATASETS.ROOT_DIR, os.path.join(out_dir, CONFIG_FILE)
    print("\nUse the model on any images:")
    print(f"  {py} tools/extract_features.py --config_file {run_cfg} --images {root}/query "
          f"--out {out_dir}/query_features.npz TEST.WEIGHT {weight}")
    print(f"  {py} tools/search.py --config_file {run_cfg} --query {root}/query "
          f"--gallery {root}/bounding_box_test --topk 10 --out {out_dir}/search TEST.WEIGHT {weight}")
    print(f"\nResults of this demo (training + evaluations: {elapsed:.0f} s):")
    print(results_table(u, t, total))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config_file", default="configs/demo/vit_svllreid_demo.yml")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = cli.parse_with_overrides(p, argv)
    output_dir: list[str] = []

    def interrupted() -> str:
        again = "run the same command (make demo) again to start the demo over"
        if not output_dir or POSITION.saved is None:
            return f"{POSITION.describe()}; {again}"
        return (f"{POSITION.describe()}; {again}, or continue its training with: {cli.python_command()} "
                f"train_svllreid.py --resume OUTPUT_DIR {output_dir[0]}")

    return cli.run(lambda: demo(args.config_file, list(args.opts), output_dir), on_interrupt=interrupted)


if __name__ == "__main__":
    sys.exit(main())
