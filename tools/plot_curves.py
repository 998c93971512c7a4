"""Draw curves.png from a run's metrics.jsonl (any time: during a run, after a crash, after a resume).

    python tools/plot_curves.py OUTPUT_DIR [--out PNG]

Lines that are not records (a torn last line, anything but a JSON object with kind, stage and
epoch) are skipped with one warning that counts them; a file without a usable record is refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

from utils import cli  # noqa: E402
from utils.logger import setup_logger  # noqa: E402
from utils.record import CURVES_FILE, METRICS_FILE, plot_curves  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir", help="the run's OUTPUT_DIR (holds metrics.jsonl)")
    p.add_argument("--out", default="", help=f"picture to write (default OUTPUT_DIR/{CURVES_FILE})")
    args = p.parse_args(argv)
    setup_logger("svllreid", None, if_train=False)     # the warning about skipped lines, as the other tools log

    def run() -> None:
        path = os.path.join(args.output_dir, METRICS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {METRICS_FILE} in {args.output_dir} (is it a training OUTPUT_DIR?)")
        out = plot_curves(path, args.out or os.path.join(args.output_dir, CURVES_FILE),
                          title=f"Training record of {args.output_dir}")
        print(out)
    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
