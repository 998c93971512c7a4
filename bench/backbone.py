"""Throughput of our CLIP ViT-B-16 image tower vs open_clip's (same random weights, same input).

Not a test. Measures, in one process and interleaved (so background load hits both alike):
  * inference: ``visual(x)`` under ``no_grad`` in eval mode, batch 16, 224x224, stride 16;
  * training step: forward + backward of the projected class token, train mode;
  * the ReID input 256x128: open_clip at its stride 16 (16x8 grid) vs ours at stride 16 (the
    same work) and at the ReID stride 12 (21x10 grid, 1.6x the tokens: the cost of overlap).
Prints median/min seconds per batch, images/s, the ours/open_clip throughput ratio (same
input only) and peak memory
(CUDA: max allocated; CPU: peak RSS growth during the call, sampled every 2 ms, with glibc
told to mmap every allocation above 128 KiB so freed tensors leave RSS and peaks stay honest).

    .venv/bin/python bench/backbone.py [--batch 16] [--repeats 5] [--device cpu] [--no-train]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import open_clip  # noqa: E402
import torch

from model.clip import build_model  # noqa: E402

from _measure import PeakMemory  # noqa: E402  (bench/, the script's folder)


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, int | None]:
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed, mem.peak


def compare(cases: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> dict[str, dict]:
    """Run the cases round-robin (warm-up first); return per-case timing and memory stats."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, int | None] = {k: 0 for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t, peak = timed(fn, device)
            times[name].append(t)
            peaks[name] = None if peak is None or peaks[name] is None else max(peaks[name], peak)
    return {k: {"median": statistics.median(v), "min": min(v), "peak": peaks[k]} for k, v in times.items()}


def report(title: str, stats: dict[str, dict], batch: int, baselines: dict[str, str]) -> None:
    """Print the table; ``baselines`` maps a row to the open_clip row on the same input."""
    print(f"\n{title}")
    print(f"  {'model':<34} {'median s':>9} {'min s':>8} {'img/s':>7} {'peak MiB':>9}  "
          "open_clip time / ours (median / min)")
    for name, s in stats.items():
        ratio = ""
        if name in baselines:
            b = stats[baselines[name]]
            ratio = f"{b['median'] / s['median']:.3f}x / {b['min'] / s['min']:.3f}x"
        print(f"  {name:<34} {s['median']:>9.3f} {s['min']:>8.3f} {batch / s['median']:>7.2f} "
              f"{'-' if s['peak'] is None else format(s['peak'] / 2**20, '.0f'):>9}  {ratio}")


def _reexec_with_honest_rss() -> None:
    """Restart once with a fixed glibc mmap threshold (CPU peak-RSS measurement, see docstring)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable] + sys.argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--no-train", action="store_true", help="skip the forward+backward comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        _reexec_with_honest_rss()
    torch.manual_seed(0)

    full = open_clip.create_model("ViT-B-16-quickgelu")
    state = full.state_dict()
    ref = full.visual.to(device)
    # open_clip on the ReID input: stride 16 on 256x128 (16x8 grid, its positional embedding resized)
    ref_reid = open_clip.create_model("ViT-B-16-quickgelu", force_image_size=(256, 128)).visual.to(device)
    ours = build_model(state, 14, 14, 16).visual.to(device)
    ours_s16 = build_model(state, 16, 8, 16).visual.to(device)
    reid = build_model(state, 21, 10, 12).visual.to(device)
    del full, state

    x224 = torch.randn(args.batch, 3, 224, 224, device=device)
    x_reid = torch.randn(args.batch, 3, 256, 128, device=device)
    models = (ref, ref_reid, ours, ours_s16, reid)
    for m in models:
        m.eval()
    with torch.no_grad():
        diff = (ours(x224[:2])[2][:, 0] - ref(x224[:2])).abs().max().item()
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}; |ours - open_clip| = {diff:.2e}")

    names = {"oc224": "open_clip ViT-B-16 224 s16", "ours224": "ours ViT-B-16 224 s16",
             "ocreid": "open_clip 256x128 s16 (16x8)", "ours_s16": "ours 256x128 s16 (16x8)",
             "reid": "ours ReID 256x128 s12 (21x10)"}
    baselines = {names["ours224"]: names["oc224"], names["ours_s16"]: names["ocreid"],
                 names["reid"]: names["ocreid"]}

    def infer(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x)
        return run

    stats = compare({names["oc224"]: infer(ref, x224), names["ours224"]: infer(ours, x224),
                     names["ocreid"]: infer(ref_reid, x_reid), names["ours_s16"]: infer(ours_s16, x_reid),
                     names["reid"]: infer(reid, x_reid)}, device, args.warmup, args.repeats)
    report("inference (eval, no_grad)", stats, args.batch, baselines)

    if not args.no_train:
        def train_step(model: torch.nn.Module, x: torch.Tensor, pooled: bool) -> Callable[[], None]:
            def run() -> None:
                out = model(x)
                (out if pooled else out[2][:, 0]).square().mean().backward()
                model.zero_grad(set_to_none=True)
            return run

        for m in models:
            m.train()
        stats = compare({names["oc224"]: train_step(ref, x224, pooled=True),
                         names["ours224"]: train_step(ours, x224, pooled=False),
                         names["ocreid"]: train_step(ref_reid, x_reid, pooled=True),
                         names["ours_s16"]: train_step(ours_s16, x_reid, pooled=False),
                         names["reid"]: train_step(reid, x_reid, pooled=False)},
                        device, max(1, args.warmup - 1), max(1, args.repeats - 2))
        report("training step (train mode, forward + backward)", stats, args.batch, baselines)

if __name__ == "__main__":
    main()
