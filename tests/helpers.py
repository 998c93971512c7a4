"""Helpers shared by the test modules: the tiny synthetic set and training options, the
one-line error check, the config flattener, the plain ranking references, and runs on several
gloo processes (:func:`run_gloo`).

Test modules import from here (or from ``reference.evaluation``), never from one another, so
that each module can be moved, marked or run on its own.
"""
from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs/demo/vit_svllreid_demo.yml")
# Every config YAML under configs/ (configs/ablations/ holds grid files of tools/ablate.py, not configs).
CONFIG_YAMLS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yml"), recursive=True)
                      if os.path.basename(os.path.dirname(p)) != "ablations")

# ----------------------------------------------------------------------------- the tiny synthetic set
#: The spec of the session's ``tiny_root`` set: 8 train ids, 4 test ids, 2 cameras, 64x32 images.
TINY_SPEC: dict[str, int] = dict(num_train_ids=8, num_test_ids=4, num_cams=2, images_per_cam=2, query_cams=1,
                                 num_distractors=2, num_junk=1, height=64, width=32, seed=3)


def synthetic_set(out: Any, **changes: int) -> str:
    """Write the tiny synthetic Market-format set (:data:`TINY_SPEC`, fields in ``changes``
    replaced) under ``out`` and return its path; the one way tests build a synthetic set."""
    from datasets.synthetic import SyntheticSpec, generate_synthetic
    generate_synthetic(str(out), SyntheticSpec(**{**TINY_SPEC, **changes}))
    return str(out)


# ----------------------------------------------------------------------------- tiny trainings
#: Overrides that make the demo config a training of seconds (1 + 2 epochs, 64x32 images).
TINY = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.STAGE1.MAX_EPOCHS", "1", "SOLVER.STAGE1.IMS_PER_BATCH", "12",
        "SOLVER.STAGE2.MAX_EPOCHS", "2", "SOLVER.STAGE2.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2",
        "SOLVER.STAGE2.EVAL_PERIOD", "2", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "1",
        "SOLVER.STAGE1.CHECKPOINT_PERIOD", "1", "SOLVER.STAGE2.STEPS", "[1, 2]", "TEST.IMS_PER_BATCH", "16"]


# The tool tests' settings: the tiny set's input size, no loader workers, small test batches.
TOOL_SIZE = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0",
             "TEST.IMS_PER_BATCH", "16"]


def tool_opts(root: Any, weight: Any, *extra: str) -> list[str]:
    """The ``KEY VALUE`` overrides of a tool run on the tiny set at ``root`` with checkpoint ``weight``."""
    return ["DATASETS.ROOT_DIR", str(root), *TOOL_SIZE, "TEST.WEIGHT", str(weight), *extra]


def train_argv(root: Any, out: Any, *opts: str) -> list[str]:
    """Command line of ``train_svllreid.py`` for a tiny run of the demo config on ``root``."""
    return ["--config_file", DEMO, "DATASETS.ROOT_DIR", str(root), "OUTPUT_DIR", str(out), *TINY, *opts]


def final_weights(out: Any) -> dict[str, torch.Tensor]:
    """The last weights file of a tiny run (:data:`TINY`: stage 2 ends at epoch 2) in ``out``."""
    return torch.load(os.path.join(str(out), "ViT-B-16_2.pth"), weights_only=True)


def tiny_cfg(root: Any, out: Any, *opts: str) -> Any:
    """The demo config for a tiny 2 + 2 epoch training on ``root``, written to ``out``."""
    from config import load_config
    return load_config(DEMO, [
        "DATASETS.ROOT_DIR", root, "OUTPUT_DIR", str(out), "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.STAGE1.MAX_EPOCHS", "2", "SOLVER.STAGE1.IMS_PER_BATCH", "12",
        "SOLVER.STAGE2.MAX_EPOCHS", "2", "SOLVER.STAGE2.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2",
        "SOLVER.STAGE2.EVAL_PERIOD", "2", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "2",
        "SOLVER.STAGE1.CHECKPOINT_PERIOD", "2", "SOLVER.STAGE2.STEPS", "[1, 2]", "TEST.IMS_PER_BATCH", "16",
        *opts])


def opts_of(cfg: Any) -> list[str]:
    """The command-line overrides that give the test script the data and input size of ``cfg``."""
    keys = ["DATASETS.ROOT_DIR", "INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST", "DATALOADER.NUM_WORKERS",
            "DATALOADER.NUM_INSTANCE", "SOLVER.STAGE2.IMS_PER_BATCH"]
    opts = []
    for k in keys:
        node = cfg
        for part in k.split("."):
            node = node[part]
        opts += [k, str(list(node)) if isinstance(node, (list, tuple)) else str(node)]
    return opts


def fake_vehicleid(root: str, train_ids: int = 6, test_ids: int = 4, per_id: int = 3) -> None:
    """A VehicleID_V1.0 tree with tiny colour-coded JPEGs (one colour family per identity)."""
    from PIL import Image
    base = os.path.join(root, "VehicleID_V1.0")
    os.makedirs(os.path.join(base, "image"))
    os.makedirs(os.path.join(base, "train_test_split"))
    g = torch.Generator().manual_seed(0)
    lines = {"train_list.txt": [], "test_list_800.txt": []}
    splits = (("train_list.txt", range(100, 100 + train_ids)), ("test_list_800.txt", range(500, 500 + test_ids)))
    for split, pids in splits:
        for pid in pids:
            colour = torch.rand(3, generator=g)
            for k in range(per_id):
                name = f"{pid:07d}{k}"
                arr = (colour.view(1, 1, 3) * 40 + 200 * torch.rand(64, 32, 3, generator=g)).clamp(0, 255)
                Image.fromarray(arr.to(torch.uint8).numpy()).save(os.path.join(base, "image", name + ".jpg"))
                lines[split].append(f"{name} {pid}")
    for split, ls in lines.items():
        with open(os.path.join(base, "train_test_split", split), "w") as f:
            f.write("\n".join(ls) + "\n")


# ----------------------------------------------------------------------------- faults
def one_line_error(capsys: Any, *names: Any) -> str:
    """The captured stderr is one `error: ...` line naming every item of ``names``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for n in names:
        assert str(n) in err, (n, err)
    assert "Traceback" not in err and "weights_only=False" not in err
    return err


def paren_depth(text: str) -> int:
    """How deep the parentheses of ``text`` nest (console messages keep it at 1)."""
    depth = deepest = 0
    for c in text:
        depth += (c == "(") - (c == ")")
        deepest = max(deepest, depth)
    return deepest


def snapshot(folder: Any) -> dict[str, bytes]:
    """{name: bytes} of every file directly in ``folder`` (what a fault must not change)."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n)) and n != ".lock"}


# ----------------------------------------------------------------------------- configs
def flat_config(node: Any) -> dict[str, Any]:
    """``{"A.B.C": value}`` of a config node, as the resume-config rules compare configs
    (tuples read as lists); the project's own flattener, so tests and code agree."""
    from config.resume import _flatten
    return _flatten(node)


# ----------------------------------------------------------------------------- ranking references
def loop_eval(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
              g_camids: np.ndarray, max_rank: int = 50) -> tuple[np.ndarray, float, float]:
    """Plain per-query Market protocol (stable argsort; CMC padded with its last value)."""
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        hits = (g_pids[order][keep] == q_pids[i]).astype(np.float64)
        if not hits.any():
            continue
        cmc = np.minimum(np.cumsum(hits), 1.0)
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1])])[:max_rank]
        cmcs.append(cmc)
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps))


def sklearn_map(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                g_camids: np.ndarray) -> float:
    """mAP via sklearn average_precision_score on the negated distances per query."""
    from sklearn.metrics import average_precision_score
    aps = []
    for i in range(distmat.shape[0]):
        keep = ~((g_pids == q_pids[i]) & (g_camids == q_camids[i]))
        y = g_pids[keep] == q_pids[i]
        if y.any():
            aps.append(average_precision_score(y, -distmat[i][keep].astype(np.float64)))
    return float(np.mean(aps))


def assert_same(ours: tuple, ref: tuple, tol: float = 1e-9) -> None:
    """``(cmc, mAP, mINP)`` of ours equal the reference's within ``tol``."""
    cmc, m_ap, m_inp = ours
    rcmc, rmap, rinp = ref
    assert cmc.shape == rcmc.shape
    np.testing.assert_allclose(cmc, rcmc, rtol=0, atol=tol)
    assert m_ap == pytest.approx(rmap, abs=tol)
    assert m_inp == pytest.approx(rinp, abs=tol)


@contextlib.contextmanager
def lock_held_elsewhere(folder: Any) -> Iterator[subprocess.Popen]:
    """Another process holds ``folder``'s run lock for the block (yields it; killed at the end)."""
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from utils.run_dir import RunLock\n"
                               f"with RunLock({str(folder)!r}):\n print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- several processes
def _gloo_rank(rank: int, world: int, init_file: str, out_dir: str, fn: Any, args: tuple) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()   # nobody tears the group down while a peer still uses it
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Any, args: tuple, out_dir: Any, world: int = 2) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes of one gloo group (one torch
    thread each) and return what each returned (tensors, lists, dicts of them), in rank order.
    ``fn`` must be a module-level function; ``out_dir`` holds the group's file and the results."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_rank, args=(world, os.path.join(str(out_dir), "init"), str(out_dir), fn, args),
             nprocs=world, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=True) for r in range(world)]


# ----------------------------------------------------------------------------- one training step of each stage
def fixed_stage_inputs(proj_dim: int, batch: int = 8, device: Any = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cached-feature stand-ins with their labels (stage 1) and a stage-2 batch (4 ids x 2, both SSL
    views) on ``device``, the same values on every device."""
    g = torch.Generator().manual_seed(5)
    img = torch.randn(batch, 3, 64, 32, generator=g)
    stage2 = {"img": img, "pid": torch.arange(batch // 2).repeat_interleave(2),
              "camid": torch.tensor([0, 1] * (batch // 2)), "viewid": torch.zeros(batch, dtype=torch.long),
              "ssl_view1": img + 0.1 * torch.randn(img.shape, generator=g),
              "ssl_view2": img.flip(-1) + 0.1 * torch.randn(img.shape, generator=g)}
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 3, 5, 6])
    feats = torch.randn(len(labels), proj_dim, generator=g)
    return feats.to(device), labels.to(device), {k: v.to(device) for k, v in stage2.items()}


def adam_grads(model: torch.nn.Module, optimizer: torch.optim.Optimizer, before: dict[str, torch.Tensor]
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (gradient, gradient + weight decay x weight before the step)} of the parameters
    ``optimizer`` steps: the second is what Adam normalises."""
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {n: (p.grad.clone(), p.grad + decay[id(p)] * before[n]) for n, p in model.named_parameters()
            if id(p) in decay and p.grad is not None}


def one_step_each_stage(cfg: Any, compiled: bool, device: Any = "cpu", deterministic: bool = False
                        ) -> tuple[dict, torch.Tensor, Any, Any, dict]:
    """(losses, stage-2 text features, model, initial prompts, gradients) after one stage-1 and one
    stage-2 step on ``device`` with the real losses, optimisers, autocast and optimiser step (as
    the training loops run them; the model built for 8 identities and 2 cameras). ``deterministic``:
    seeded as SOLVER.DETERMINISTIC seeds (left on afterwards)."""
    from loss import SimCLRLoss, SupConLoss, make_loss, make_ssl_loss
    from model import make_model, move_model
    from processor.amp import autocast, make_scaler, optimizer_step
    from processor.compiled import compile_model
    from processor.processor_stage1 import set_stage1_modes, stage1_forward_loss
    from processor.processor_stage2 import compute_text_features, stage2_forward_loss
    from solver import make_optimizer_1stage, make_optimizer_2stage
    from utils.misc import set_seed

    device = torch.device(device)
    set_seed(0, deterministic)
    model = move_model(make_model(cfg, num_class=8, camera_num=2, view_num=1), device)
    start = model.prompt_learner.cls_ctx.detach().clone()
    if compiled:
        compile_model(model, device)
    feats, labels, batch = fixed_stage_inputs(model.in_planes_proj, device=device)
    scaler = make_scaler(device)
    out = {}

    model.set_stage(1)
    set_stage1_modes(model)
    opt1 = make_optimizer_1stage(cfg, model)
    torch.manual_seed(1)                     # the same prompt masks in both runs
    loss, parts = stage1_forward_loss(model, feats, labels, SupConLoss(),
                                      SimCLRLoss(temperature=cfg.MODEL.SSL_TEMPERATURE, gather=False),
                                      cfg.SOLVER.STAGE1.SSL_LOSS_WEIGHT, device,
                                      torch.unique(labels.cpu()).to(device))     # as the training loop passes them
    out["stage1"] = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer_step(scaler, loss, opt1)
    grads = adam_grads(model, opt1, before)

    model.set_stage(2)
    loss_fn, center = make_loss(cfg, 8, feat_dim=model.feature_dims[0])
    if center is not None:
        center.to(device)
    opt2, _ = make_optimizer_2stage(cfg, model, center)
    text = compute_text_features(model, 8, 3, device)        # 3 + 3 + 2 labels: a partial last batch
    model.train()
    with autocast(device):
        loss, parts, _ = stage2_forward_loss(cfg, model, batch, text, loss_fn, make_ssl_loss(cfg))
    out["stage2"] = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer_step(scaler, loss, opt2)
    grads.update(adam_grads(model, opt2, before))
    return out, text, model, start, grads


# ----------------------------------------------------------------------------- interrupted runs
class Interrupt(Exception):
    """Raised by :func:`interrupt_after`: a run killed right after it saved ``last.pth``."""


def interrupt_after(monkeypatch: Any, stage: int, epoch: int) -> None:
    """Make the save of ``last.pth`` at (``stage``, ``epoch``) end the run with :class:`Interrupt`
    right after writing it (use inside ``monkeypatch.context()`` to interrupt one run only)."""
    import processor.processor_stage1 as stage1_mod
    import processor.processor_stage2 as stage2_mod
    module = stage1_mod if stage == 1 else stage2_mod
    original = module.save_train_state

    def save_then_die(output_dir: str, st: int, ep: int, *args: Any, **kwargs: Any) -> None:
        original(output_dir, st, ep, *args, **kwargs)
        if (st, ep) == (stage, epoch):
            raise Interrupt()

    monkeypatch.setattr(module, "save_train_state", save_then_die)
