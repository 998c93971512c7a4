"""Export the retrieval model of a checkpoint to ONNX, verified with onnxruntime.

    python tools/export_onnx.py --config_file configs/person/vit_svllreid.yml --out model.onnx \\
        TEST.WEIGHT output/market/ViT-B-16_60.pth [KEY VALUE ...]

The checkpoint is TEST.WEIGHT (same loading rules as evaluation). The graph maps a
preprocessed batch (N x 3 x H x W, dynamic N) to the retrieval feature, with int64 ``camid``
/ ``viewid`` inputs when the model uses side information. The file is checked with
``onnx.checker`` and onnxruntime's features are compared with PyTorch's on real images
(``--images PATH``, repeatable; else the configured dataset's query images); a difference above ``--atol`` is
an error and no file is written. Prints the metadata stored in the file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from utils.entry import guard_startup  # noqa: E402  (stdlib only: before the slow imports)

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

from retrieval.export import DEFAULT_ATOL, DEFAULT_OPSET, ExportReport, ExportVerificationError, export  # noqa: E402
from tools._common import load_tool_config  # noqa: E402
from utils import cli  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SVLL-ReID ONNX export (retrieval features)")
    p.add_argument("--config_file", default="", help="path to a YAML config file")
    p.add_argument("--out", required=True, help="the .onnx file to write (its folder is created)")
    p.add_argument("--images", action="append", default=None, metavar="PATH",
                   help="an image file or folder for the onnxruntime check, repeatable "
                        "(default: the dataset's query images)")
    p.add_argument("--verify_batch", type=int, default=5, help="images in the onnxruntime check (and 1 alone)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}); one the exporter cannot convert to is refused")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max abs feature difference allowed")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (TEST.WEIGHT is required)")
    return cli.parse_with_overrides(p, argv)


def print_report(r: ExportReport) -> None:
    """What the deployer needs: file, inputs/outputs, metadata, and the parity check."""
    print(f"exported {r.path} ({r.size_bytes / 2**20:.1f} MiB, {r.seconds:.1f} s)")
    h, w = r.metadata["input_size"].split(",")
    shapes = {"images": f"float32 [N, 3, {h}, {w}]", "camid": "int64 [N]", "viewid": "int64 [N]"}
    print("inputs:  " + ", ".join(f"{n} {shapes[n]}" for n in r.inputs))
    print(f"output:  features float32 [N, {r.metadata['feat_dim']}]")
    print("metadata:")
    for k, v in r.metadata.items():
        print(f"  {k:<22} {v}")
    print(f"onnxruntime vs PyTorch on {r.source}:")
    for c in r.checks:
        print(f"  batch {c['batch']}: max abs diff {c['max_abs_diff']:.2e} (features up to "
              f"{c['max_abs_feature']:.3g}; tolerance {r.atol:g})")
    print("OK")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify_batch < 1:
        print("error: --verify_batch must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)

    def run() -> None:
        print_report(export(load_tool_config(args.config_file, args.opts), args.out, verify_batch=args.verify_batch,
                            opset=args.opset, atol=args.atol, images=args.images))

    try:
        return cli.run(run)
    except ExportVerificationError as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
