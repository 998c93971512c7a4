"""onnxruntime (CPU) vs PyTorch eager throughput of the exported retrieval model, in one run.

Not a test, and no target: information for deployers. For each model (full size, random
weights, 256x128 input, as the person configs: ViT-B-16 stride 12 with camera SIE, ViT-B-16
stride 16, RN50) it builds the SVLL-ReID model, exports the retrieval graph exactly as
``tools/export_onnx.py`` does (dynamic batch), checks the two outputs agree, then times
``model(x, cam_label=...)`` under ``no_grad`` in eval mode and ``InferenceSession.run`` on the
same batch, interleaved (background load hits both alike), with the same number of threads.
Prints median/min seconds per batch, images/s and the onnxruntime / PyTorch speed ratio.

    .venv/bin/python bench/onnx_runtime.py [--models vit12 vit16 rn50] [--batch 16] [--repeats 5] [--threads 0]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort  # noqa: E402
import torch

from config import load_config  # noqa: E402
from model import make_model  # noqa: E402
from retrieval.export import IMAGE_INPUT, OUTPUT_NAME, export_graph, side_inputs  # noqa: E402

from _measure import timed_round_robin  # noqa: E402  (bench/, the script's folder)

MODELS = {   # name: (label, config overrides)
    "vit12": ("ViT-B-16 stride 12 (21x10), camera SIE",
              ["MODEL.NAME", "ViT-B-16", "MODEL.STRIDE_SIZE", "[12,12]", "MODEL.SIE_CAMERA", "True"]),
    "vit16": ("ViT-B-16 stride 16 (16x8)", ["MODEL.NAME", "ViT-B-16", "MODEL.STRIDE_SIZE", "[16,16]"]),
    "rn50": ("RN50", ["MODEL.NAME", "RN50"]),
}
CAMERAS = 6


def bench_model(key: str, batch: int, warmup: int, repeats: int, threads: int, tmp: str) -> dict:
    label, opts = MODELS[key]
    cfg = load_config("", ["MODEL.CLIP_INIT", "random", "MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", "[256,128]",
                           "INPUT.SIZE_TEST", "[256,128]"] + opts)
    torch.manual_seed(0)
    model = make_model(cfg, num_class=751, camera_num=CAMERAS, view_num=1).eval()
    use_sie = model.cv_embed is not None
    info = {"use_sie": use_sie, "sie_camera": use_sie and cfg.MODEL.SIE_CAMERA, "sie_view": False,
            "camera_num": CAMERAS, "view_num": 1}
    side = side_inputs(info)
    path = os.path.join(tmp, f"{key}.onnx")
    t = time.perf_counter()
    export_graph(model, info, path, {}, cfg.INPUT.SIZE_TEST, batch=2)
    export_s = time.perf_counter() - t
    opt = ort.SessionOptions()
    opt.intra_op_num_threads = threads
    opt.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opt, providers=["CPUExecutionProvider"])

    x = torch.randn(batch, 3, 256, 128, generator=torch.Generator().manual_seed(0))
    cam = torch.arange(batch) % CAMERAS
    feed = {IMAGE_INPUT: x.numpy(), **({"camid": cam.numpy()} if side else {})}
    kwargs = {"cam_label": cam} if side else {}

    def eager() -> np.ndarray:
        with torch.no_grad():
            return model(x, **kwargs).numpy()

    def onnx_run() -> np.ndarray:
        return session.run([OUTPUT_NAME], feed)[0]

    diff = float(np.abs(eager() - onnx_run()).max())
    times = timed_round_robin({"pytorch": eager, "onnxruntime": onnx_run}, warmup, repeats)
    return {"label": label, "export_s": export_s, "mib": os.path.getsize(path) / 2**20, "diff": diff,
            **{k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="threads for both runtimes (0: all cores)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPUExecutionProvider), {os.cpu_count()} "
          f"cores, {threads} threads each, batch {args.batch}, input 256x128, {args.repeats} timed runs")
    print(f"{'model':<40} {'export s':>8} {'MiB':>6} {'max|diff|':>9} {'PyTorch img/s':>13} "
          f"{'ORT img/s':>9} {'ORT/PyTorch (median / min)':>27}")
    print("load average at start: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            r = bench_model(key, args.batch, args.warmup, args.repeats, threads, tmp)
            pt, ox = r["pytorch"], r["onnxruntime"]
            print(f"{r['label']:<40} {r['export_s']:>8.1f} {r['mib']:>6.0f} {r['diff']:>9.1e} "
                  f"{args.batch / pt['median']:>13.2f} {args.batch / ox['median']:>9.2f} "
                  f"{pt['median'] / ox['median']:>19.2f}x / {pt['min'] / ox['min']:.2f}x", flush=True)
    print("load average at end:   " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
