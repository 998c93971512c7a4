"""Evaluate a trained SVLL-ReID checkpoint.

    python test_svllreid.py --config_file configs/person/vit_svllreid.yml TEST.WEIGHT output/.../ViT-B-16_60.pth

The model is sized from the checkpoint (our weights + their metadata JSON, or a published
SVLL-ReID / CLIP-ReID state dict); only the query and gallery folders are read and no CLIP
weights file is needed. Testing on another dataset than the training one (cross-dataset) works;
TEST.USE_SIE decides whether the camera/view embedding is used. VehicleID is evaluated on
DATASETS.VEHICLEID_TRIALS random query/gallery splits and the R1, R5 and mAP are averaged.

Writes results.json (+ test_log.txt) into OUTPUT_DIR when it is given on the command line,
else beside the checkpoint in ``<checkpoint>_eval_<dataset>/``; never over a training run's
results.json. With TEST.VISUALIZE True also writes
``visualize/`` (cmc.png, worst_NN.png and best_NN.png ranked lists) beside results.json.
The folder is locked while an evaluation runs; an earlier evaluation's results.json,
test_log.txt and visualize/ are moved into ``previous-<time>/`` first (logged), never replaced.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from utils.entry import guard_startup  # stdlib only: imported before the slow imports

guard_startup(__name__)   # Ctrl-C / SIGTERM during the imports: one line, no traceback

import numpy as np
import yaml

from config import ConfigError, load_config
from datasets.make_dataloader import build_dataset_from_cfg, make_val_loader
from model import load_for_inference, move_model
from processor import evaluate_loader
from processor.compiled import compile_model
from processor.inference import visualize_evaluation
from utils import cli
from utils.checkpoint import require_checkpoint_file
from utils.logger import setup_logger
from utils.misc import (
    choose_device,
    refuse_on_every_rank,
    select_gpus,
    set_cpu_threads,
    set_seed,
    world_processes,
    write_json_atomic,
)
from utils.run_dir import TRAINING_FILES, RunLock, previous_evaluation_aside


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SVLL-ReID evaluation")
    p.add_argument("--config_file", default="", help="path to a YAML config file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (TEST.WEIGHT is required)")
    return cli.parse_with_overrides(p, argv)


def _average_trials(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of mAP, mINP and the CMC curve over VehicleID trials (the per-trial results are kept)."""
    return {"mAP": float(np.mean([t["mAP"] for t in trials])),
            "cmc": np.mean([t["cmc"] for t in trials], axis=0).tolist(),
            "mINP": float(np.mean([t["mINP"] for t in trials])),
            "dataset": trials[0]["dataset"], "re_ranking": trials[0]["re_ranking"],
            "trials": trials}


def default_output_dir(cfg: Any) -> str:
    """Where results go when OUTPUT_DIR is not given on the command line: a folder beside the
    checkpoint named after it and the test set, e.g. ``out/ViT-B-16_60_eval_market1501/``."""
    weight = os.path.abspath(os.path.expanduser(cfg.TEST.WEIGHT))
    stem = os.path.splitext(os.path.basename(weight))[0]
    suffix = "_reranked" if cfg.TEST.RE_RANKING else ""
    return os.path.join(os.path.dirname(weight), f"{stem}_eval_{cfg.DATASETS.NAMES}{suffix}")


def _check_output_dir(out: str) -> None:
    """Never write over a training run's results.json."""
    if any(os.path.isfile(os.path.join(out, f)) for f in TRAINING_FILES):
        raise ConfigError(f"OUTPUT_DIR {out} holds a training run; its results.json would be overwritten. "
                          "Give another OUTPUT_DIR, or none to write beside the checkpoint")


def processes_problem(world: int) -> str | None:
    """Why ``world`` processes cannot run an evaluation (None when they can): it runs in one process,
    and several would each evaluate alone into the same folder."""
    if world > 1:
        return (f"test_svllreid.py evaluates in one process, and {world} were started (torchrun's WORLD_SIZE): each "
                "would evaluate alone into the same folder; run it without torchrun or tools/launch.py")
    return None


def check_launch(argv: Sequence[str], world: int | None) -> None:
    """What ``tools/launch.py`` checks once, before it starts ``world`` processes: one process."""
    problem = processes_problem(world or 1)
    if problem:
        raise ConfigError(problem)


def evaluate(cfg: Any, output_dir: str | None = None) -> dict[str, Any]:
    """Evaluate TEST.WEIGHT on the configured test set; returns the results dict.

    The model is sized from the checkpoint (and its metadata file); only the query and
    gallery folders are read and no CLIP weights file is needed. Results (``results.json``)
    and the log go to ``output_dir`` (default: :func:`default_output_dir`).
    """
    problem = processes_problem(world_processes())
    if problem:
        refuse_on_every_rank(problem)
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: give the checkpoint to evaluate, e.g. TEST.WEIGHT out/ViT-B-16_60.pth")
    require_checkpoint_file(cfg.TEST.WEIGHT)
    out = output_dir or default_output_dir(cfg)
    _check_output_dir(out)
    select_gpus(cfg.MODEL.DEVICE_ID, cuda_wanted=cfg.MODEL.DEVICE.startswith("cuda"))
    device_choice = choose_device(cfg.MODEL.DEVICE)   # CUDA asked for and not usable: refused before any file
    with RunLock(out):       # one evaluation per folder at a time
        moved = previous_evaluation_aside(out)
        return _evaluate(cfg, out, moved, device_choice)


def _evaluate(cfg: Any, out: str, moved: str | None, device_choice: tuple[Any, str]) -> dict[str, Any]:
    """:func:`evaluate` in ``out``, locked and cleared of an earlier evaluation (``moved`` says where it went),
    on the device of ``device_choice`` (``utils.misc.choose_device``)."""
    logger = setup_logger("svllreid", out, if_train=False)
    if moved:
        logger.info(moved)
    set_seed(cfg.SOLVER.SEED, cfg.SOLVER.DETERMINISTIC)
    device, device_note = device_choice
    logger.info("%s", device_note)
    if device.type == "cpu":
        set_cpu_threads(cfg.DATALOADER.NUM_WORKERS)

    dataset = build_dataset_from_cfg(cfg, trial=0, test_only=True)
    model, info = load_for_inference(cfg, dataset)
    model = move_model(model, device)
    if cfg.SOLVER.COMPILE:
        compile_model(model, device)

    n_trials = cfg.DATASETS.VEHICLEID_TRIALS if cfg.DATASETS.NAMES == "VehicleID" else 1
    trials, first = [], None
    for trial in range(n_trials):
        if trial:
            dataset = build_dataset_from_cfg(cfg, trial=trial, test_only=True)
        val_loader, num_query = make_val_loader(cfg, dataset)
        evaluation = evaluate_loader(cfg, model, val_loader, num_query, device)
        first = first or evaluation
        trials.append(evaluation.results)
    results = trials[0] if n_trials == 1 else _average_trials(trials)
    if n_trials > 1:
        logger.info("VehicleID (%d, mean of %d trials): mAP %.1f%%  R1 %.1f%%  R5 %.1f%%",
                    cfg.DATASETS.VEHICLEID_TEST_SIZE, n_trials, 100 * results["mAP"],
                    100 * results["cmc"][0], 100 * results["cmc"][4])
    meta = info["metadata"] or {}
    results.update({
        "weight": os.path.abspath(cfg.TEST.WEIGHT),
        "checkpoint": {"model": info["model_name"], "dataset": info["dataset"], "epoch": meta.get("epoch"),
                       "commit": meta.get("commit"), "num_classes": info["num_classes"],
                       "camera_num": info["camera_num"], "view_num": info["view_num"],
                       "sie_camera": info["sie_camera"], "sie_view": info["sie_view"],
                       "not_loaded": info["left_out"]},
        "dataset": cfg.DATASETS.NAMES, "dataset_root": os.path.abspath(os.path.expanduser(cfg.DATASETS.ROOT_DIR)),
        "re_ranking": bool(cfg.TEST.RE_RANKING), "use_sie": info["use_sie"], "sie_reason": info["sie_reason"],
        "config": yaml.safe_load(cfg.dump()),
    })
    path = os.path.join(out, "results.json")
    write_json_atomic(path, results)
    logger.info("Wrote %s", path)
    if cfg.TEST.VISUALIZE:   # beside results.json; the ranked lists of VehicleID are trial 0's
        visualize_evaluation(cfg, first.feats, first.samples, first.num_query, results,
                             os.path.join(out, "visualize"))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    explicit = "OUTPUT_DIR" in args.opts[0::2]

    def run() -> dict[str, Any]:
        cfg = load_config(args.config_file, args.opts)
        return evaluate(cfg, cfg.OUTPUT_DIR if explicit else None)
    return cli.run(run)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
