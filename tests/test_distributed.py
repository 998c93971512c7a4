"""Multi-process training with torch.distributed (gloo on CPU, 2 processes)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import test_svllreid
from config import load_config
from loss import SimCLRLoss, make_loss
from model import make_model
from processor.processor_stage2 import stage2_forward_loss
from tests.helpers import run_gloo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs/demo/vit_svllreid_demo.yml")
TINY = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.STAGE1.IMS_PER_BATCH", "12", "SOLVER.STAGE2.IMS_PER_BATCH", "8",
        "DATALOADER.NUM_INSTANCE", "2", "TEST.IMS_PER_BATCH", "16"]


def test_several_processes_without_dist_train_refuse_once(monkeypatch, tmp_path, capsys):
    """Under torchrun without MODEL.DIST_TRAIN, every process trained (or evaluated) alone into the same
    folder; now each refuses at once, rank 0 with the one line and the others silently."""
    import train_svllreid
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert train_svllreid.main(["--config_file", DEMO, "MODEL.DEVICE", "cpu", "OUTPUT_DIR",
                                    str(tmp_path / "run")]) == 2
        assert test_svllreid.main(["--config_file", DEMO, "MODEL.DEVICE", "cpu", "TEST.WEIGHT", str(tmp_path / "w"),
                                   "OUTPUT_DIR", str(tmp_path / "eval")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 * lines, err
        assert all(line.startswith("error: ") for line in err), err
        assert not lines or "MODEL.DIST_TRAIN True" in err[0] and "evaluates in one process" in err[1], err
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "eval")


@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_results(tiny_root, tmp_path):
    """1 epoch of each stage on 2 gloo processes; the gathered evaluation equals a 1-process one."""
    out = tmp_path / "ddp"
    opts = ["DATASETS.ROOT_DIR", tiny_root, *TINY]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_svllreid.py"), "--config_file", DEMO, *opts, "OUTPUT_DIR", str(out),
           "MODEL.DIST_TRAIN", "True", "SOLVER.STAGE1.MAX_EPOCHS", "1", "SOLVER.STAGE2.MAX_EPOCHS", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SVLLREID_PROGRESS="off")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("ViT-B-16_stage1_1.pth", "ViT-B-16_1.pth", "last.pth", "results.json", "train_log.txt"):
        assert (out / name).is_file(), name
    with open(out / "results.json") as f:
        ddp_results = json.load(f)
    # the same checkpoint evaluated by one process gives the same numbers
    assert test_svllreid.main(["--config_file", DEMO, *opts, "TEST.WEIGHT", str(out / "ViT-B-16_1.pth"),
                               "OUTPUT_DIR", str(tmp_path / "single")]) == 0
    with open(tmp_path / "single" / "results.json") as f:
        single = json.load(f)
    assert single["mAP"] == pytest.approx(ddp_results["mAP"], abs=1e-6)
    assert single["cmc"] == pytest.approx(ddp_results["cmc"], abs=1e-6)


# ----------------------------------------------------------------------------- one stage-2 step
B = 8   # global batch: 4 identities x 2 images


def _step_cfg(root):
    # Batch-hard triplet mining is per process (as in every DDP ReID trainer), so it is off here;
    # ID, I2T and SimCLR (negatives gathered across ranks) decompose over the global batch.
    return load_config(DEMO, ["DATASETS.ROOT_DIR", root, *TINY, "MODEL.TRIPLET_LOSS_WEIGHT", "0"])


def _global_batch():
    g = torch.Generator().manual_seed(123)
    img = torch.randn(B, 3, 64, 32, generator=g)
    return {"img": img, "pid": torch.arange(4).repeat_interleave(2), "camid": torch.tensor([0, 1] * 4),
            "viewid": torch.zeros(B, dtype=torch.long),
            "ssl_view1": img + 0.1 * torch.randn(img.shape, generator=g),
            "ssl_view2": img.flip(-1) + 0.1 * torch.randn(img.shape, generator=g)}


def _step(cfg, model, batch):
    """One SGD step of the real stage-2 loss; BatchNorm uses running statistics (eval mode)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    text_features = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    loss_fn, _ = make_loss(cfg, 8)
    loss, _, _ = stage2_forward_loss(cfg, model, batch, text_features, loss_fn, SimCLRLoss())
    opt.zero_grad()
    loss.backward()
    opt.step()


def _fresh_model(cfg):
    torch.manual_seed(0)
    m = make_model(cfg, num_class=8, camera_num=2, view_num=1)
    m.set_stage(2)
    return m


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, world, root):
    cfg = _step_cfg(root)
    model = _fresh_model(cfg)
    ddp = DistributedDataParallel(model)
    n = B // world
    _step(cfg, ddp, {k: v[rank * n:(rank + 1) * n] for k, v in _global_batch().items()})
    return _flat(model)


def test_ddp_step_syncs_ranks_and_equals_single_process_step(tiny_root, tmp_path):
    rank0, rank1 = run_gloo(_worker, (tiny_root,), tmp_path)
    assert torch.equal(rank0, rank1), "parameters differ between ranks after one step"

    cfg = _step_cfg(tiny_root)
    start = _flat(_fresh_model(cfg))
    single = _fresh_model(cfg)
    _step(cfg, single, _global_batch())
    moved = (_flat(single) - start).abs().max().item()
    assert moved > 1e-3                                   # the step really changed the weights
    assert torch.allclose(rank0, _flat(single), atol=1e-5, rtol=0), (rank0 - _flat(single)).abs().max()
