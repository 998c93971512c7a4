"""Evaluate a trained SVLL-ReID checkpoint.

    python test_svllreid.py --config_file configs/person/vit_svllreid.yml TEST.WEIGHT output/.../ViT-B-16_60.pth

VehicleID is evaluated on DATASETS.VEHICLEID_TRIALS random query/gallery splits and the
R1, R5 and mAP are averaged. Writes OUTPUT_DIR/results.json; with TEST.VISUALIZE True also
OUTPUT_DIR/visualize/ (cmc.png, worst_NN.png and best_NN.png ranked lists).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np

from config import ConfigError, load_config
from datasets.make_dataloader import build_dataset_from_cfg, make_val_loader
from model import make_model
from processor import do_inference
from utils.checkpoint import load_model_weights
from utils.inference_io import visualize_evaluation
from utils import cli
from utils.logger import setup_logger
from utils.misc import resolve_device, select_gpus, set_cpu_threads, set_seed, write_json_atomic


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SVLL-ReID evaluation")
    p.add_argument("--config_file", default="", help="path to a YAML config file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (TEST.WEIGHT is required)")
    return p.parse_args(argv)


def _average_trials(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of mAP, mINP and the CMC curve over VehicleID trials (the per-trial results are kept)."""
    return {"mAP": float(np.mean([t["mAP"] for t in trials])),
            "cmc": np.mean([t["cmc"] for t in trials], axis=0).tolist(),
            "mINP": float(np.mean([t["mINP"] for t in trials])),
            "dataset": trials[0]["dataset"], "re_ranking": trials[0]["re_ranking"],
            "trials": trials}


def evaluate(cfg: Any) -> dict[str, Any]:
    """Load TEST.WEIGHT into the configured model and evaluate; returns the results dict."""
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: give the checkpoint to evaluate, e.g. TEST.WEIGHT out/ViT-B-16_60.pth")
    logger = setup_logger("svllreid", cfg.OUTPUT_DIR, if_train=False)
    set_seed(cfg.SOLVER.SEED)
    select_gpus(cfg.MODEL.DEVICE_ID, cuda_wanted=cfg.MODEL.DEVICE.startswith("cuda"))
    device = resolve_device(cfg.MODEL.DEVICE)
    if device.type == "cpu":
        set_cpu_threads(cfg.DATALOADER.NUM_WORKERS)

    dataset = build_dataset_from_cfg(cfg, trial=0)
    model = make_model(cfg, num_class=dataset.num_train_pids, camera_num=dataset.num_train_cams,
                       view_num=dataset.num_train_vids)
    load_model_weights(model, cfg.TEST.WEIGHT)
    model.to(device)
    logger.info("Loaded %s", cfg.TEST.WEIGHT)

    n_trials = cfg.DATASETS.VEHICLEID_TRIALS if cfg.DATASETS.NAMES == "VehicleID" else 1
    trials, kept = [], {}
    for trial in range(n_trials):
        if trial:
            dataset = build_dataset_from_cfg(cfg, trial=trial)
        val_loader, num_query = make_val_loader(cfg, dataset)
        trials.append(do_inference(cfg, model, val_loader, num_query, device, keep=kept if trial == 0 else None))
    results = trials[0] if n_trials == 1 else _average_trials(trials)
    if n_trials > 1:
        logger.info("VehicleID (%d, mean of %d trials): mAP %.1f%%  R1 %.1f%%  R5 %.1f%%",
                    cfg.DATASETS.VEHICLEID_TEST_SIZE, n_trials, 100 * results["mAP"],
                    100 * results["cmc"][0], 100 * results["cmc"][4])
    results["weight"] = cfg.TEST.WEIGHT
    write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "results.json"), results)
    if cfg.TEST.VISUALIZE:   # beside results.json; the ranked lists of VehicleID are trial 0's
        visualize_evaluation(cfg, kept["feats"], kept["samples"], kept["num_query"], results,
                             os.path.join(cfg.OUTPUT_DIR, "visualize"))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: evaluate(load_config(args.config_file, args.opts)))


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
