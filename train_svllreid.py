"""Train SVLL-ReID: stage 1 (prompts + language SSL), then stage 2 (image encoder + vision SSL).

    python train_svllreid.py --config_file configs/person/vit_svllreid.yml [KEY VALUE ...] [--overwrite]
    python train_svllreid.py --resume OUTPUT_DIR output/market        # continue a run

The ``base`` configs (MODEL.PROMPT_LEARNING False) skip stage 1 and the I2T loss.
Writes ``config.yaml``, checkpoints, ``last.pth`` (full training state for ``--resume``),
``train_log.txt``, ``results.json`` and the training record (``metrics.jsonl``,
``tensorboard/``, ``curves.png``) into OUTPUT_DIR, which the run locks while it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from utils.entry import guard_startup  # stdlib only: imported before the slow imports

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from config import ConfigError, load_config, settings_summary
from config.resume import resume_config
from datasets import make_dataloader
from datasets.bases import dataset_identity
from datasets.make_dataloader import build_dataset_from_cfg
from loss import make_loss, make_ssl_loss
from model import make_model, move_model
from processor import Stage2Criteria, do_inference, do_train_stage1, do_train_stage2
from processor.compiled import compile_model
from processor.meters import hms
from processor.position import POSITION
from processor.train_state import check_same_data, load_train_state
from solver import create_scheduler, create_warmup_multistep, make_optimizer_1stage, make_optimizer_2stage
from utils import cli
from utils.dist import broadcast_object, cleanup, get_world_size, init_distributed, is_dist, is_main_process
from utils.logger import setup_logger
from utils.misc import (
    choose_device,
    local_processes,
    refuse_on_every_rank,
    resolve_num_workers,
    select_gpus,
    set_cpu_threads,
    set_seed,
    world_processes,
    write_json_atomic,
)
from utils.record import METRICS_FILE, TrainingRecord, read_metrics, write_curves
from utils.run_dir import CONFIG_FILE, RunError, RunLock, prepare_output_dir, save_run_config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SVLL-ReID training")
    p.add_argument("--config_file", default="", help="path to a YAML config file")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT_DIR from its last.pth, with its saved config.yaml")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUTPUT_DIR that holds a run (its files move to previous-<time>/)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # old launchers
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = cli.parse_with_overrides(p, argv)   # flags also accepted after the overrides
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    return args


def _wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` under torchrun, the model itself otherwise.

    Built once per stage: DDP fixes the set of parameters it synchronises at construction.
    """
    if not is_dist():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def processes_problem(cfg: Any, world: int) -> str | None:
    """Why ``world`` processes cannot run the training of ``cfg`` (None when they can): without
    MODEL.DIST_TRAIN each one would train the whole run alone into the same OUTPUT_DIR."""
    if world > 1 and not cfg.MODEL.DIST_TRAIN:
        return (f"{world} processes were started (torchrun's WORLD_SIZE) and MODEL.DIST_TRAIN is False: each would "
                "train the whole run alone into the same OUTPUT_DIR; add MODEL.DIST_TRAIN True to share one run "
                "among them, or start one process")
    return None


def check_launch(argv: Sequence[str], world: int | None) -> None:
    """What ``tools/launch.py`` checks once, before it starts ``world`` processes (None: not known
    before they meet): the config, and that the processes can share the training. Raises the refusal."""
    args = parse_args(argv)
    cfg = resume_config(args.config_file, args.opts) if args.resume else None
    cfg = cfg or load_config(args.config_file, args.opts)
    problem = processes_problem(cfg, world or 1)
    if problem:
        raise ConfigError(problem)


def train(cfg: Any, resume: bool = False, evaluate_untrained: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Run the configured training; returns {'trained': metrics[, 'untrained': metrics]}.

    Single process, or one process per device under ``torchrun`` with MODEL.DIST_TRAIN.
    OUTPUT_DIR is locked for the run; one that holds a run needs ``resume`` or ``overwrite``.
    """
    t0 = time.time()
    problem = processes_problem(cfg, world_processes())
    if problem:
        refuse_on_every_rank(problem)
    select_gpus(cfg.MODEL.DEVICE_ID, cuda_wanted=cfg.MODEL.DEVICE.startswith("cuda"))
    device, device_note = choose_device(cfg.MODEL.DEVICE)   # refused here, before any process group
    if cfg.MODEL.DIST_TRAIN:
        device = init_distributed(device.type, cfg.MODEL.DIST_TIMEOUT)
    POSITION.reset()
    try:
        with RunLock(cfg.OUTPUT_DIR) if is_main_process() else contextlib.nullcontext():
            notes = _claim_output_dir(cfg, resume, overwrite)
            stage_seconds: dict[str, float] = {}
            with TrainingRecord(cfg.OUTPUT_DIR, enabled=is_main_process()) as record:
                out = _train(cfg, device, resume, evaluate_untrained, [*notes, device_note], record, stage_seconds)
            write_curves(cfg.OUTPUT_DIR, enabled=is_main_process())
            if is_main_process():
                log_run_summary(cfg, time.time() - t0, stage_seconds, device)
            return out
    finally:
        cleanup()


def _metrics_text(r: dict[str, Any]) -> str:
    ranks = ", ".join(f"R{k} {100 * r[f'R{k}']:.1f}%" for k in (1, 5) if isinstance(r.get(f"R{k}"), float))
    minp = f", mINP {100 * r['mINP']:.1f}%" if isinstance(r.get("mINP"), float) else ""
    return f"mAP {100 * r['mAP']:.1f}%, {ranks}{minp}"


def log_run_summary(cfg: Any, seconds: float, stage_seconds: dict[str, float], device: torch.device) -> None:
    """The last lines of a training: its time, the best and the final stage-2 evaluation of the run
    (from ``metrics.jsonl``, earlier sessions of a resumed run included) and the files it wrote."""
    logger = logging.getLogger("svllreid")
    out = cfg.OUTPUT_DIR
    parts = "; ".join(f"{k} {hms(v)}" for k, v in stage_seconds.items())
    peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"
            if device.type == "cuda" else "")
    logger.info("Run finished in %s%s%s", hms(seconds), f": {parts}" if parts else "", peak)
    path = os.path.join(out, METRICS_FILE)
    evals = {r["epoch"]: r for r in (read_metrics(path) if os.path.isfile(path) else [])
             if r["kind"] == "eval" and r["stage"] == 2 and isinstance(r.get("mAP"), float)}
    if evals:
        final = evals[max(evals)]
        best = max(evals.values(), key=lambda r: r["mAP"])
        logger.info("Best evaluation at epoch %d: %s; final at epoch %d: %s", best["epoch"], _metrics_text(best),
                    final["epoch"], _metrics_text(final))
    weights = sorted((f for f in os.listdir(out) if f.startswith(f"{cfg.MODEL.NAME}_") and f.endswith(".pth")
                      and "_stage1_" not in f), key=lambda f: os.path.getmtime(os.path.join(out, f)))
    files = [f for f in (weights[-1:] + ["results.json", "last.pth", CONFIG_FILE, "train_log.txt", METRICS_FILE,
                                         "curves.png", "tensorboard"]) if os.path.exists(os.path.join(out, f))]
    logger.info("Files in %s: %s", out, ", ".join(files))


def _claim_output_dir(cfg: Any, resume: bool, overwrite: bool) -> list[str]:
    """Check OUTPUT_DIR on rank 0 (lock held) and give every rank the same verdict."""
    notes, error = [], None
    if is_main_process():
        try:
            notes = prepare_output_dir(cfg.OUTPUT_DIR, resume, overwrite)
        except RunError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise RunError(error)
    return notes


def _train(cfg: Any, device: torch.device, resume: bool, evaluate_untrained: bool,
           notes: list[str], record: TrainingRecord, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """The training in a claimed OUTPUT_DIR; ``notes`` are logged first, ``stage_seconds`` gets the
    time of each part (untrained evaluation, stage 1, stage 2 with its evaluations)."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    logger = setup_logger("svllreid", cfg.OUTPUT_DIR, if_train=True, is_main=is_main_process())
    # the state to continue is checked against the run before anything is written or loaded
    # (a refused --resume leaves the folder as it was, its train_log.txt included)
    state = load_train_state(cfg.OUTPUT_DIR, cfg) if resume else None
    for note in notes:
        logger.info("%s", note)
    if is_main_process() and state is None:     # a resumed run's, once its data is checked (below)
        save_run_config(cfg.OUTPUT_DIR, cfg)
    for line in settings_summary(cfg, os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE)):
        logger.info("%s", line)
    if is_dist():
        logger.info("Distributed: %d processes (%s), %d images per process in stage 2",
                    get_world_size(), dist.get_backend(), cfg.SOLVER.STAGE2.IMS_PER_BATCH // get_world_size())
    set_seed(cfg.SOLVER.SEED, cfg.SOLVER.DETERMINISTIC)
    if device.type == "cpu":
        n = set_cpu_threads(cfg.DATALOADER.NUM_WORKERS, local_processes())
        if n is not None:
            logger.info("CPU: %d torch thread(s) beside %d loader worker(s)", n,
                        resolve_num_workers(cfg.DATALOADER.NUM_WORKERS))

    dataset = build_dataset_from_cfg(cfg)
    identity = dataset_identity(dataset, content=True)
    if state is not None:    # data regenerated or replaced since the run began is not this run's
        check_same_data(state, identity, cfg.OUTPUT_DIR)
        if is_main_process():
            save_run_config(cfg.OUTPUT_DIR, cfg)
    data = make_dataloader(cfg, dataset=dataset)
    model = make_model(cfg, num_class=data.num_classes, camera_num=data.camera_num,
                       view_num=data.view_num)
    model = move_model(model, device)
    model.data_identity = identity      # into every checkpoint's metadata and last.pth
    if cfg.MODEL.SSL_SYNC_BN and is_dist():
        if device.type == "cuda":
            model.sync_ssl_batchnorm()
        else:
            logger.warning("MODEL.SSL_SYNC_BN: SyncBatchNorm needs CUDA; keeping per-process BatchNorm on the CPU")
    if cfg.SOLVER.COMPILE:   # in place, before any DDP wrapper (processor/compiled.py)
        compile_model(model, device)

    out: dict[str, Any] = {}
    if evaluate_untrained:
        logger.info("Evaluating the untrained model")
        t0 = time.time()
        out["untrained"] = do_inference(cfg, model, data.val, data.num_query, device)
        stage_seconds["untrained evaluation"] = time.time() - t0
        record.log_eval(0, 0, out["untrained"])

    if resume and state is None:
        logger.warning("--resume: no %s/last.pth yet; starting from scratch", cfg.OUTPUT_DIR)
    if state is not None:
        POSITION.saved = (state["stage"], state["epoch"])

    if cfg.MODEL.PROMPT_LEARNING and not (state and state["stage"] == 2):
        model.set_stage(1, train_text_mlp=cfg.MODEL.TRAIN_TEXT_MLP_STAGE1)
        optimizer1 = make_optimizer_1stage(cfg, model)
        scheduler1 = create_scheduler(cfg.SOLVER.STAGE1, optimizer1)
        t0 = time.time()
        do_train_stage1(cfg, _wrap(model, device), data.train_stage1, optimizer1, scheduler1, device,
                        resume_state=state if state and state["stage"] == 1 else None, record=record)
        stage_seconds["stage 1"] = time.time() - t0

    model.set_stage(2)
    loss_fn, center_criterion = make_loss(cfg, data.num_classes, feat_dim=model.feature_dims[0])
    if center_criterion is not None:
        center_criterion.to(device)
    ssl_loss = make_ssl_loss(cfg) if cfg.MODEL.USE_SSL else None
    optimizer2, optimizer_center = make_optimizer_2stage(cfg, model, center_criterion)
    scheduler2 = create_warmup_multistep(cfg.SOLVER.STAGE2, optimizer2)
    criteria = Stage2Criteria(loss_fn, ssl_loss, center_criterion, optimizer_center)
    t0 = time.time()
    out["trained"] = do_train_stage2(cfg, _wrap(model, device), data, optimizer2, scheduler2, criteria, device,
                                     resume_state=state if state and state["stage"] == 2 else None, record=record)
    if out["trained"] is None:   # resumed after the last epoch: evaluate the final weights
        out["trained"] = do_inference(cfg, model, data.val, data.num_query, device)
    stage_seconds["stage 2 with its evaluations"] = time.time() - t0
    if is_main_process():
        write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "results.json"), out["trained"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir: list[str] = []

    def run() -> None:
        cfg = resume_config(args.config_file, args.opts) if args.resume else None
        if cfg is None:
            cfg = load_config(args.config_file, args.opts)
        output_dir.append(cfg.OUTPUT_DIR)
        train(cfg, resume=args.resume, overwrite=args.overwrite)

    def interrupted() -> str:
        if not output_dir or POSITION.saved is None:
            return POSITION.describe()
        return (f"{POSITION.describe()}; continue with: {cli.python_command()} train_svllreid.py --resume "
                f"OUTPUT_DIR {output_dir[0]}")

    return cli.run(run, on_interrupt=interrupted)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
