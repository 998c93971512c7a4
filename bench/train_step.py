"""Bench: training and inference throughput of the GPU path, eager and compiled, in one run.

Not a test. One process measures, with the training code itself (random weights, no CLIP file):

* **stage-1 step**: a batch of cached image features (random, on the device; new labels every
  step, as the shuffled epoch gives) through ``processor_stage1.stage1_forward_loss`` and
  ``processor.amp.optimizer_step``, with the stage-1 optimiser and modes and the loop's loss meters
  (``processor.meters.EpochMeters``, read from the device once per LOG_PERIOD steps);
* **stage-2 step**: one real loader batch (uint8, pinned) per step, moved and finished by
  ``processor.batches.to_device`` with the loader's device transform (normalising, erasing),
  ``stage2_forward_loss`` under ``processor.amp.autocast`` (fp16 on CUDA), ``optimizer_step``
  with the GradScaler, the loop's loss and accuracy meters (read once per LOG_PERIOD steps);
* **inference**: one real evaluation batch per call, ``to_device`` + ``processor.inference.encode_retrieval``
  in eval mode under no_grad and autocast;

each eager, then compiled as ``SOLVER.COMPILE`` compiles (``processor.compiled.compile_model``):
img/s (samples per second: a stage-1 sample is a feature, a stage-2 sample an image with its
two SSL views), peak memory (CUDA: the most allocated during the timed steps, everything
included; CPU: peak RSS growth during them, sampled), the first call's time and the compile
time (warm-up time beyond as many steady steps), FLOPs per sample (``FlopCounterMode`` over one
eager call, forward + backward for the steps) and the achieved fraction of the device's dense
fp16 peak (:data:`PEAK_TFLOPS`; other devices and the CPU: achieved FLOP/s, "peak unknown").

Then, on a synthetic set written by ``datasets.synthetic`` (the ``tools/make_synthetic.py``
generator, Market-sized 128x64 JPEGs):

* **loader alone**: ``bench/loader.py``'s ``loader_rates`` (one worker process's images/s);
* **stage-2 epoch**: ``processor_stage2.do_train_stage2`` for one epoch (the real loop and
  loaders), its samples/s against the stage-2 step alone (target >= 90%);
* **feature extraction**: ``processor.inference.extract_features`` over query + gallery
  against inference alone (target >= 70%).

Order: the eager rows of every model (and the first model's end-to-end rows, eager), then the
compiled step rows of every model, then the first model's end-to-end rows compiled; a model
waits on the CPU while another is measured. Models are sized by the synthetic set (its
identities and cameras), as training sizes them. Defaults: CUDA when present, with the
published ViT-B-16 (stride 12, camera SIE, 256x128) and RN50 configs, stage 2 at 64 = 16 ids
x 4 with both SSL views, stage 1 at the configs' batch (256 features for ViT-B-16, 64 for
RN50), inference at 256, and a time budget of 360 s (a row that would not fit is printed as
skipped, one still running 15 s after the budget is stopped); on the CPU, the demo configs'
tiny models at small batches, no budget. A row that fails prints its error and the
bench goes on (exit code 1 at the end). Rows are printed as they come (and written to
``--json``), the tables at the end.

    .venv/bin/python bench/train_step.py [--device cuda] [--models vit rn50] [--no-compile]
        [--steps N] [--budget SECONDS] [--json rows.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from config import load_config
from datasets import make_dataloader
from datasets.synthetic import SyntheticSpec, generate_synthetic
from loss import SimCLRLoss, SupConLoss, make_loss, make_ssl_loss
from model import make_model, move_model
from processor.amp import autocast, make_scaler, optimizer_step
from processor.batches import device_transform_of, eval_mode, host_to_device, set_loader_epoch, to_device
from processor.compiled import compile_model
from processor.inference import encode_retrieval, extract_features
from processor.meters import EpochMeters
from processor.processor_stage1 import set_stage1_modes, stage1_forward_loss
from processor.processor_stage2 import Stage2Criteria, compute_text_features, do_train_stage2, stage2_forward_loss
from solver import create_warmup_multistep, make_optimizer_1stage, make_optimizer_2stage
from utils.device_info import device_peak
from utils.misc import set_cpu_threads
from utils.record import NULL_RECORD

from _measure import PeakMemory  # bench/, the script's folder

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

@dataclasses.dataclass
class Sizes:
    """What one device measures: configs, batches, steps, the synthetic set and the budget."""
    configs: dict[str, str]
    stage1_batch: int                      # 0: the config's SOLVER.STAGE1.IMS_PER_BATCH (what users run)
    stage2_batch: int
    test_batch: int
    warmup: int
    steps: int
    spec: SyntheticSpec
    loader_images: int
    loader_repeats: int
    budget: float                          # seconds; 0: no limit
    compile_estimate: dict[str, float]     # seconds per compiled row before one was measured
    overrides: list[str] = dataclasses.field(default_factory=list)


SIZES = {
    "cuda": Sizes(configs={"vit": "configs/person/vit_svllreid.yml", "rn50": "configs/person/cnn_svllreid.yml"},
                  stage1_batch=0, stage2_batch=64, test_batch=256, warmup=3, steps=20,
                  spec=SyntheticSpec(num_train_ids=250, num_test_ids=100, num_cams=4, images_per_cam=4),
                  loader_images=256, loader_repeats=2, budget=360.0,
                  # the first compiled ViT-B-16 stage-2 step took 69 s on an H200 (by hand)
                  compile_estimate={"stage-1 step": 45, "stage-2 step": 80, "inference": 30, "stage-2 epoch": 40}),
    "cpu": Sizes(configs={"vit": "configs/demo/vit_svllreid_demo.yml", "rn50": "configs/demo/cnn_svllreid_demo.yml"},
                 stage1_batch=16, stage2_batch=16, test_batch=32, warmup=1, steps=3,
                 # 12 identities: the models take the set's count (a fixed 16 here once hid a mismatch)
                 spec=SyntheticSpec(num_train_ids=12, num_test_ids=32, num_cams=4, images_per_cam=4),
                 loader_images=64, loader_repeats=1, budget=0.0,
                 compile_estimate={"stage-1 step": 60, "stage-2 step": 90, "inference": 30, "stage-2 epoch": 30},
                 overrides=["SOLVER.STAGE2.WARMUP_ITERS", "2"]),
}
LABELS = {"vit": "ViT-B-16", "rn50": "RN50"}


# ----------------------------------------------------------------------------- measuring
class BudgetExceeded(Exception):
    """The run's time budget ran out in the middle of a row."""


class Budget:
    """Wall-clock budget of the run: a row starts only when its estimate fits what is left, and
    a row still running ``grace`` seconds after the budget is stopped (:meth:`arm`)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return math.inf if not self.seconds else self.seconds - (time.perf_counter() - self.start)

    def allows(self, estimate: float) -> bool:
        return estimate <= self.left()

    def arm(self, grace: float) -> None:
        if self.seconds and hasattr(signal, "SIGALRM"):
            def stop(signum: int, frame: Any) -> None:
                raise BudgetExceeded(f"stopped at the time budget ({self.seconds:.0f} s + {grace:.0f} s, --budget)")
            signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, max(1.0, self.left() + grace))

    def disarm(self) -> None:
        if self.seconds and hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """First call (timed alone: it compiles), ``warmup`` more, then ``steps`` timed calls."""
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - start
    with PeakMemory(device, growth=False) as mem:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        step = (time.perf_counter() - t0) / steps
    return {"first_s": first, "step_s": step, "compile_s": max(0.0, warm - (warmup + 1) * step), "peak": mem.peak}


def count_flops(fn: Callable[[], None]) -> int:
    """Model FLOPs of one call (matrix products, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- the rows
@dataclasses.dataclass
class Row:
    model: str
    row: str
    variant: str = ""
    per_s: float | None = None
    step_ms: float | None = None
    peak_mib: float | None = None
    first_s: float | None = None
    compile_s: float | None = None
    gflop_per_sample: float | None = None
    tflops: float | None = None
    peak_frac: float | None = None
    note: str = ""
    against: str = ""              # end-to-end rows: what they are compared with
    ratio: float | None = None
    target: str = ""


class Report:
    """The rows, printed as they come and as markdown tables at the end; the JSON file kept current."""

    def __init__(self, json_path: str | None, header: dict[str, Any]) -> None:
        self.rows: list[Row] = []
        self.extra: dict[str, Any] = {}
        self.json_path, self.header, self.failed = json_path, header, 0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(row).items()
                 if v not in (None, "")}
        print(f"  {shown}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"header": self.header, "rows": [dataclasses.asdict(r) for r in self.rows],
                           **self.extra}, f, indent=1)

    def run(self, model: str, row: str, variant: str, fn: Callable[[], Row | None]) -> Row | None:
        """``fn()``'s row, or a row saying how it failed (the bench goes on)."""
        try:
            return fn()
        except BudgetExceeded as e:
            return self.add(Row(model, row, variant, note=str(e)))
        except Exception as e:      # noqa: BLE001 -- one failed row must not lose the others
            self.failed += 1
            traceback.print_exc(limit=3)
            return self.add(Row(model, row, variant, note=failure(e)))

    def skip(self, model: str, row: str, variant: str, why: str) -> None:
        self.add(Row(model, row, variant, note=f"skipped: {why}"))

    def find(self, model: str, row: str, variant: str) -> Row | None:
        return next((r for r in self.rows if (r.model, r.row, r.variant) == (model, row, variant)
                     and r.per_s is not None), None)


def failure(e: BaseException) -> str:
    """A failed row's note: the error's type and the start of its message, on one line."""
    return f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def fmt(v: float | None, spec: str, empty: str = "-") -> str:
    return empty if v is None else format(v, spec)


def print_tables(report: Report, peak_name: str, peak: float | None, source: str) -> None:
    print("\n## Steps (same run)\n")
    print("| model | row | variant | samples/s | ms/step | peak MiB | first call s | compile s | GFLOP/sample "
          "| TFLOP/s | of peak | note |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in report.rows:
        if r.row not in ("stage-1 step", "stage-2 step", "inference"):
            continue
        frac = "peak unknown" if peak is None else fmt(r.peak_frac, ".1%")
        print(f"| {r.model} | {r.row} | {r.variant} | {fmt(r.per_s, '.1f')} | {fmt(r.step_ms, '.1f')} "
              f"| {fmt(r.peak_mib, '.0f')} | {fmt(r.first_s, '.1f')} | {fmt(r.compile_s, '.1f')} "
              f"| {fmt(r.gflop_per_sample, '.2f')} | {fmt(r.tflops, '.2f')} | {frac} | {r.note} |")
    print(f"\nPeak: {peak_name}: " + (f"{peak:.1f} TFLOP/s dense fp16 ({source})" if peak else "peak unknown")
          + ". Stage-1 samples are cached features, stage-2 samples images with their two SSL views.")
    print("\n## Data and end to end (same run)\n")
    print("| model | row | variant | samples/s | against | ratio | target | note |")
    print("|---|---|---|---:|---|---:|---:|---|")
    for r in report.rows:
        if r.row in ("stage-1 step", "stage-2 step", "inference"):
            continue
        print(f"| {r.model} | {r.row} | {r.variant} | {fmt(r.per_s, '.1f')} | {r.against} "
              f"| {fmt(r.ratio, '.1%')} | {r.target} | {r.note} |")


# ----------------------------------------------------------------------------- one model
class Bench:
    """What every model shares: the device, sizes, report, budget and the synthetic set."""

    def __init__(self, args: argparse.Namespace, device: torch.device, sizes: Sizes, report: Report,
                 budget: Budget, root: str, out_dir: str) -> None:
        self.args, self.device, self.sizes, self.report, self.budget = args, device, sizes, report, budget
        self.root, self.out_dir = root, out_dir
        self.peak = device_peak(device)[1]
        self.compile_seconds: dict[str, float] = {}

    def config(self, key: str) -> Any:
        s = self.sizes
        stage1 = ["SOLVER.STAGE1.IMS_PER_BATCH", str(s.stage1_batch)] if s.stage1_batch else []
        return load_config(str(ROOT / s.configs[key]), [*stage1,
            "MODEL.DEVICE", self.device.type, "MODEL.CLIP_INIT", "random", "DATASETS.NAMES", "folder",
            "DATASETS.ROOT_DIR", self.root, "OUTPUT_DIR", os.path.join(self.out_dir, key),
            "SOLVER.STAGE2.IMS_PER_BATCH", str(s.stage2_batch),
            "TEST.IMS_PER_BATCH", str(s.test_batch), "SOLVER.STAGE2.MAX_EPOCHS", "1",
            "SOLVER.STAGE2.CHECKPOINT_PERIOD", "1", "SOLVER.STAGE2.LOG_PERIOD", "1000",
            "DATALOADER.NUM_WORKERS", str(self.args.workers), *s.overrides])

    def estimate(self, row: str) -> float:
        """Seconds a compiled row is expected to take: as measured for the model before, else the default."""
        return self.compile_seconds.get(row, self.sizes.compile_estimate[row])

    def over_budget(self) -> str:
        return f"time budget ({self.budget.seconds:.0f} s, --budget)"


class ModelBench:
    """One model (``vit`` or ``rn50``): its config, loaders, batches and the step functions of the rows."""

    ROWS = ("stage-1 step", "stage-2 step", "inference")

    def __init__(self, bench: Bench, key: str) -> None:
        self.bench, self.key, self.label = bench, key, LABELS[key]
        dev = bench.device
        self.cfg = cfg = bench.config(key)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.data = data = make_dataloader(cfg)
        # sized by the data, as training sizes them: the text features and the classifier must agree
        self.num_classes = n_cls = data.num_classes
        self.model = model = move_model(make_model(cfg, num_class=n_cls, camera_num=data.camera_num,
                                                   view_num=data.view_num), dev)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"\n{self.label}: built in {time.perf_counter() - t0:.1f} s ({params:.1f}M parameters, "
              f"{n_cls} identities), {time.perf_counter() - bench.budget.start:.0f} s into the run", flush=True)
        # stage 1: cached features with new labels every step, at the config's batch
        b1 = cfg.SOLVER.STAGE1.IMS_PER_BATCH
        g = torch.Generator().manual_seed(1)
        self.feats = [torch.randn(b1, model.in_planes_proj, generator=g).to(dev) for _ in range(8)]
        self.host_labels = [torch.randint(0, n_cls, (b1,), generator=g) for _ in range(8)]
        self.labels = [y.to(dev) for y in self.host_labels]
        # stage 2: one real loader batch (uint8, pinned), finished on the device at every step
        set_loader_epoch(self.data.train_stage2, cfg.SOLVER.SEED, 1)
        self.cpu_batch = next(iter(self.data.train_stage2))
        self.text = None
        if model.prompt_learning and cfg.MODEL.I2T_LOSS_WEIGHT > 0:
            self.text = compute_text_features(model, n_cls, cfg.SOLVER.STAGE1.IMS_PER_BATCH, dev)
        self.loss_fn, self.center = make_loss(cfg, n_cls, feat_dim=model.feature_dims[0])
        if self.center is not None:
            self.center.to(dev)
        use_ssl = cfg.MODEL.USE_SSL and cfg.SOLVER.STAGE2.SSL_LOSS_WEIGHT > 0
        self.ssl_loss = make_ssl_loss(cfg) if use_ssl else None
        # inference: one real evaluation batch (the evaluation loader keeps its workers)
        self.val_batch = next(iter(self.data.val))
        self.flops: dict[str, int | None] = {}
        self.compiled = False

    # -------------------------------------------------------------- the step functions: (call, samples per call)
    def stage1(self) -> tuple[Callable[[], None], int]:
        cfg, model, dev = self.cfg, self.model, self.bench.device
        model.set_stage(1, train_text_mlp=cfg.MODEL.TRAIN_TEXT_MLP_STAGE1)
        set_stage1_modes(model)
        opt, scaler = make_optimizer_1stage(cfg, model), make_scaler(dev)
        supcon, simclr = SupConLoss(), SimCLRLoss(temperature=cfg.MODEL.SSL_TEMPERATURE, gather=False)
        ssl_weight = cfg.SOLVER.STAGE1.SSL_LOSS_WEIGHT if cfg.MODEL.USE_SSL_STAGE1 else 0.0
        count = iter(range(1 << 30))
        meters = EpochMeters(1, ("loss", "i2t", "t2i", "ssl"), NULL_RECORD, dev)   # as the training loop
        meters.start(1)

        def step() -> None:
            i = next(count)
            f, y = self.feats[i % len(self.feats)], self.labels[i % len(self.labels)]
            # the unique labels from a host copy, as the training loop takes them (no device sync)
            unique = host_to_device(torch.unique(self.host_labels[i % len(self.labels)]), dev)
            opt.zero_grad(set_to_none=True)
            loss, parts = stage1_forward_loss(model, f, y, supcon, simclr, ssl_weight, dev, unique)
            optimizer_step(scaler, loss, opt)
            meters.update({"loss": loss, **parts}, len(y))     # read once per log period, as in training
            if (i + 1) % cfg.SOLVER.STAGE1.LOG_PERIOD == 0:
                meters.read()
        return step, len(self.labels[0])

    def stage2(self) -> tuple[Callable[[], None], int]:
        cfg, model, dev = self.cfg, self.model, self.bench.device
        model.set_stage(2)
        model.train()
        opt, _ = make_optimizer_2stage(cfg, model, self.center)
        scaler = make_scaler(dev)
        prepare = device_transform_of(self.data.train_stage2)
        count = iter(range(1 << 30))
        meters = EpochMeters(2, ("loss", "id", "tri", "i2t", "ssl", "acc"), NULL_RECORD, dev)   # as the training loop
        meters.start(1)

        def step() -> None:
            batch = to_device(self.cpu_batch, dev, prepare)
            opt.zero_grad(set_to_none=True)
            with autocast(dev):
                loss, parts, out = stage2_forward_loss(cfg, model, batch, self.text, self.loss_fn, self.ssl_loss)
            optimizer_step(scaler, loss, opt)
            acc = (out["scores"][0].argmax(dim=1) == batch["pid"]).float().mean()
            meters.update({"loss": loss, **parts, "acc": acc}, len(batch["pid"]))   # read once per log period
            if (next(count) + 1) % cfg.SOLVER.STAGE2.LOG_PERIOD == 0:
                meters.read()
        return step, len(self.cpu_batch["pid"])

    def inference(self) -> tuple[Callable[[], None], int]:
        model, dev = self.model, self.bench.device
        prepare = device_transform_of(self.data.val)

        def call() -> None:
            with torch.no_grad(), eval_mode(model) as net:
                batch = to_device(self.val_batch, dev, prepare)
                with autocast(dev):
                    encode_retrieval(net, batch).float()
        return call, len(self.val_batch["pid"])

    def make(self, row: str) -> tuple[Callable[[], None], int]:
        return {"stage-1 step": self.stage1, "stage-2 step": self.stage2, "inference": self.inference}[row]()

    # -------------------------------------------------------------- rows
    def step_row(self, row: str, variant: str) -> Row:
        b, s = self.bench, self.bench.sizes
        fn, per_call = self.make(row)
        m = measure(fn, b.device, s.warmup, b.args.steps or s.steps)
        r = Row(self.label, row, variant, per_s=per_call / m["step_s"], step_ms=1000 * m["step_s"],
                peak_mib=None if m["peak"] is None else m["peak"] / MiB, first_s=m["first_s"],
                compile_s=m["compile_s"] if variant == "compiled" else None)
        flops = self.flops.get(row)
        if flops:
            r.gflop_per_sample = flops / per_call / 1e9
            r.tflops = flops / m["step_s"] / 1e12
            r.peak_frac = r.tflops / b.peak if b.peak else None
        if variant == "compiled":
            b.compile_seconds[row] = m["compile_s"]
        return b.report.add(r)

    def eager_rows(self) -> None:
        for row in self.ROWS:
            try:
                fn, _ = self.make(row)
                fn()                       # first call: lazy state (optimiser, scaler) outside the count
                self.flops[row] = count_flops(fn)
            except Exception as e:     # noqa: BLE001 -- no FLOP count is no reason to stop
                print(f"  FLOP count of {self.label} {row} failed: {type(e).__name__}: {e}", file=sys.stderr)
        for row in self.ROWS:
            self.bench.report.run(self.label, row, "eager", lambda row=row: self.step_row(row, "eager"))

    def compiled_rows(self) -> None:
        """The three rows compiled, or none of them (a model compiled in place stays compiled)."""
        b = self.bench
        if b.args.no_compile:
            for row in self.ROWS:
                b.report.skip(self.label, row, "compiled", "--no-compile")
            return
        if not b.budget.allows(sum(b.estimate(row) for row in self.ROWS) + 10):
            for row in self.ROWS:
                b.report.skip(self.label, row, "compiled", f"{b.over_budget()}; run --models {self.key} alone")
            return
        compile_model(self.model, b.device)
        self.compiled = True
        for row in self.ROWS:
            b.report.run(self.label, row, "compiled", lambda row=row: self.step_row(row, "compiled"))

    def end_to_end(self, variant: str) -> None:
        """The stage-2 epoch and the feature extraction, with the model as it is now (eager or compiled)."""
        b, rep, dev = self.bench, self.bench.report, self.bench.device
        cfg, model, data = self.cfg, self.model, self.data
        step_row, infer_row = rep.find(self.label, "stage-2 step", variant), rep.find(self.label, "inference", variant)
        compiling = variant == "compiled" and self.text is not None    # the epoch compiles the text-feature graph
        if step_row is None:
            rep.skip(self.label, "stage-2 epoch", variant, f"no {variant} stage-2 step row to compare with")
        elif not b.budget.allows(b.estimate("stage-2 epoch") if compiling else 20):
            rep.skip(self.label, "stage-2 epoch", variant, b.over_budget())
        else:
            def epoch() -> Row:
                records: list[dict[str, Any]] = []
                model.set_stage(2)
                opt, opt_center = make_optimizer_2stage(cfg, model, self.center)
                scheduler = create_warmup_multistep(cfg.SOLVER.STAGE2, opt)
                set_loader_epoch(data.train_stage2, cfg.SOLVER.SEED, 1)
                start = time.perf_counter()        # what every epoch pays before its first batch
                next(iter(data.train_stage2))
                startup = time.perf_counter() - start
                start = time.perf_counter()
                do_train_stage2(cfg, model, data._replace(val=None), opt, scheduler,
                                Stage2Criteria(self.loss_fn, self.ssl_loss, self.center, opt_center), dev,
                                record=EpochRecord(records))
                wall = time.perf_counter() - start
                rec = next(r for r in records if r["kind"] == "epoch")
                batches = len(data.train_stage2)
                n = batches * cfg.SOLVER.STAGE2.IMS_PER_BATCH
                steady = n / max(rec["seconds"] - startup, 1e-9)
                r = Row(self.label, "stage-2 epoch", variant, per_s=rec["samples_per_s"],
                        note=f"{batches} batches ({n} samples) in {rec['seconds']:.1f} s, of which {startup:.1f} s "
                             f"before the first batch (worker start-up, every epoch): {steady:.1f}/s without it "
                             f"(a Market-1501 epoch has 202 batches); {wall:.1f} s with the text features and "
                             "the checkpoint writes")
                return rep.add(attach(r, step_row, "stage-2 step alone", 0.90))
            rep.run(self.label, "stage-2 epoch", variant, epoch)
        if infer_row is None:
            rep.skip(self.label, "feature extraction", variant, f"no {variant} inference row to compare with")
            return
        if not b.budget.allows(15):
            rep.skip(self.label, "feature extraction", variant, b.over_budget())
            return

        def extraction() -> Row:
            n = len(data.val.dataset)
            extract_features(cfg, model, data.val, dev)       # warm: persistent workers, the padded last batch
            sync(dev)
            start = time.perf_counter()
            extract_features(cfg, model, data.val, dev)
            sync(dev)
            seconds = time.perf_counter() - start
            r = Row(self.label, "feature extraction", variant, per_s=n / seconds,
                    note=f"{n} images in {len(data.val)} batches, {seconds:.2f} s (second pass)")
            return rep.add(attach(r, infer_row, "inference alone", 0.70))
        rep.run(self.label, "feature extraction", variant, extraction)

    def park(self) -> None:
        """Off the device while another model is measured (its rows' peaks stay its own)."""
        self.model.cpu()
        self.feats = [f.cpu() for f in self.feats]
        self.labels = [y.cpu() for y in self.labels]
        self.text = self.text.cpu() if self.text is not None else None
        if self.bench.device.type == "cuda":
            torch.cuda.empty_cache()

    def unpark(self) -> None:
        dev = self.bench.device
        self.model.to(dev)
        self.feats = [f.to(dev) for f in self.feats]
        self.labels = [y.to(dev) for y in self.labels]
        self.text = self.text.to(dev) if self.text is not None else None


def run_models(bench: Bench, keys: list[str]) -> None:
    """Eager rows of every model (and the first model's end-to-end rows), then the compiled rows:
    the run's budget goes to the eager picture of every model first."""
    rep, budget = bench.report, bench.budget
    models: list[ModelBench] = []
    for i, key in enumerate(keys):
        label = LABELS[key]
        if not budget.allows(30):
            for row in ModelBench.ROWS:
                rep.skip(label, row, "eager", bench.over_budget())
            continue
        try:
            mb = ModelBench(bench, key)
            mb.eager_rows()
            if i == 0:
                mb.end_to_end("eager")
            mb.park()
            models.append(mb)
        except BudgetExceeded as e:
            rep.add(Row(label, "model", "eager", note=str(e)))
        except Exception as e:       # noqa: BLE001 -- the other model may still be measured
            rep.failed += 1
            traceback.print_exc(limit=3)
            rep.add(Row(label, "model", "eager", note=failure(e)))
    # compiled: the step rows of every model, then the first model's end-to-end rows (the lowest
    # priority under the budget); a model is dropped as soon as nothing more is measured with it
    first = models[0] if models else None
    for mb in models:
        _compiled_phase(bench, mb, mb.compiled_rows)
        if mb is not first:
            _drop(bench, mb)
    if first is not None and first.compiled:
        _compiled_phase(bench, first, lambda: first.end_to_end("compiled"))
    if first is not None:
        _drop(bench, first)


def _compiled_phase(bench: Bench, mb: ModelBench, work: Callable[[], None]) -> None:
    """``work()`` with ``mb`` on the device; a failure becomes its row and the bench goes on."""
    rep = bench.report
    try:
        mb.unpark()
        work()
        mb.park()
    except BudgetExceeded as e:
        rep.add(Row(mb.label, "model", "compiled", note=str(e)))
    except Exception as e:       # noqa: BLE001
        rep.failed += 1
        traceback.print_exc(limit=3)
        rep.add(Row(mb.label, "model", "compiled", note=failure(e)))


def _drop(bench: Bench, mb: ModelBench) -> None:
    """Free a model, its loaders and buffers before what comes next."""
    mb.park()
    mb.__dict__.clear()
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


class EpochRecord:
    """A training record that keeps the records in memory (the epoch's seconds and samples/s)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def log(self, stage: int, epoch: int, iteration: int | None = None, kind: str = "period",
            step: int | None = None, **values: Any) -> None:
        self.records.append({"stage": stage, "epoch": epoch, "kind": kind, **values})

    def log_eval(self, stage: int, epoch: int, results: dict[str, Any]) -> None:
        pass


def attach(r: Row, against: Row | None, name: str, target: float) -> Row:
    """``r`` with its ratio to ``against`` (same variant) and the target."""
    r.against = f"{name} ({against.per_s:.1f}/s)" if against else f"{name} (not measured)"
    r.ratio = r.per_s / against.per_s if against and r.per_s else None
    verdict = "" if r.ratio is None else (" met" if r.ratio >= target else " NOT met")
    r.target = f">= {target:.0%}{verdict}"
    return r


# ----------------------------------------------------------------------------- loader
def loader_module() -> Any:
    """``bench/loader.py`` (its ``loader_rates``), loaded from beside this file."""
    spec = importlib.util.spec_from_file_location("bench_loader", Path(__file__).with_name("loader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loader_rows(report: Report, sizes: Sizes, root: str, device: torch.device) -> None:
    mod = loader_module()

    def run() -> Row:
        rows = mod.loader_rates(root, str(ROOT / sizes.configs["vit"]), images=sizes.loader_images,
                                batch=sizes.stage2_batch, repeats=sizes.loader_repeats, device=device)
        report.extra["loader_rates"] = rows
        last = None
        for r in rows:
            row = Row("-", "loader alone", f"per worker, {r['pipeline']}", per_s=r["after_per_s"],
                      note=f"{r['unit']}; the old per-image pipeline {r['before_per_s']:.0f}/s; device half "
                           f"{r['device_ms_per_batch']:.2f} ms per batch of {r['batch']} on {r['device']}")
            row.against, row.target = "one loader process", ""
            last = report.add(row)
        return last
    report.run("-", "loader alone", "per worker", run)


def workers_needed(report: Report) -> list[str]:
    """For each measured step rate: the loader workers that deliver it (from the per-worker rates)."""
    lines = []
    per_worker = {r.variant.split(", ")[-1]: r.per_s for r in report.rows if r.row == "loader alone" and r.per_s}
    for r in report.rows:
        kind = {"stage-2 step": "stage2", "inference": "test"}.get(r.row)
        if kind and r.per_s and per_worker.get(kind):
            lines.append(f"{r.model} {r.row} {r.variant}: {r.per_s:.0f}/s needs >= "
                         f"{math.ceil(r.per_s / per_worker[kind])} loader workers at {per_worker[kind]:.0f}/s each")
    return lines


# ----------------------------------------------------------------------------- main
def _reexec_with_honest_rss() -> None:
    """Restart once with glibc mapping every allocation above 128 KiB on its own, so that freed
    tensors leave the RSS and the CPU peaks are those of each row (as bench/backbone.py does)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--models", nargs="+", default=["vit", "rn50"], choices=list(LABELS))
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per row (default: 20 on CUDA, 3 on the CPU)")
    ap.add_argument("--workers", type=int, default=-1, help="DATALOADER.NUM_WORKERS (-1: from the cores)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run; rows that would not fit are skipped (default: 360 on CUDA, "
                         "none on the CPU; 0: none)")
    ap.add_argument("--data", default=None, help="folder for the synthetic set (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file (kept current)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device.type == "cpu":
        _reexec_with_honest_rss()
        set_cpu_threads(args.workers)      # as training does: the cores the loader workers leave
    sizes = SIZES[device.type]
    budget = Budget(sizes.budget if args.budget is None else args.budget)
    peak_name, peak, source = device_peak(device)
    header = {"torch": torch.__version__, "device": peak_name, "peak_tflops": peak, "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "budget_s": budget.seconds,
              "compile": not args.no_compile, "models": args.models}
    print(f"torch {torch.__version__}, device {peak_name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          f"threads, load average {os.getloadavg()[0]:.1f}, budget {budget.seconds or 'none'} s, "
          f"compile {'off' if args.no_compile else 'on'}", flush=True)
    report = Report(args.json, header)
    budget.arm(grace=15)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        root = args.data or os.path.join(tmp, "synthetic")
        t0 = time.perf_counter()
        if not (os.path.isdir(root) and os.listdir(root)):
            counts = generate_synthetic(root, sizes.spec)
            print(f"synthetic set: {sum(counts.values())} images ({counts}) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        if budget.allows(20):
            loader_rows(report, sizes, root, device)
        else:
            report.skip("-", "loader alone", "per worker", "time budget")
        bench = Bench(args, device, sizes, report, budget, root, os.path.join(tmp, "runs"))
        try:
            run_models(bench, args.models)
        except BudgetExceeded as e:
            report.add(Row("-", "run", "", note=str(e)))
    budget.disarm()
    print_tables(report, peak_name, peak, source)
    lines = workers_needed(report)
    if lines:
        print("\nLoader workers that keep up (a step's samples/s over one worker's):\n")
        for line in lines:
            print(f"* {line}")
    print(f"\n(total {time.perf_counter() - budget.start:.0f} s; load average at the end {os.getloadavg()[0]:.1f}; "
          f"{report.failed} row(s) failed)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
