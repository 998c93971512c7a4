"""SOLVER.COMPILE: the compiled model trains and evaluates like the eager one, and its files are the eager files.

Tolerances. Inductor fuses and reorders float32 operations (other reduction orders, fused
multiply-adds), so a compiled step differs from the eager one by float rounding, not by its
math. Measured on the tiny ViT and RN50 here, one step of each stage with the real optimiser
(Adam): losses within 7e-7 relative, gradients within 1e-5 of each tensor's largest entry,
weights within 7e-7 absolute, stage-2 text features within 2e-6. The asserts allow 1e-4
relative on the losses, 1e-4 of the largest entry (+ 1e-6) on the gradients and 1e-5
absolute on the weights, a fiftieth of the smallest learning rate of the demo config (5e-4):
a wrong graph (a missing term, a wrong sign, a step on the wrong parameters) moves the weights
by about the learning rate and the gradients by their own size, and fails.
Adam's first step moves a weight by about lr x sign(gradient + decay x weight): where that sum
is 0 (the key bias of attention and a bias right before BatchNorm have a true gradient of 0)
or nearly, its sign is rounding noise in eager and compiled alike, so those entries (under 5%)
are held to their gradients, not their weights.
Random numbers: inductor draws them with its own generator, so stage 1's prompt masks would
differ; ``compile_model`` compiles with ``fallback_random``, which makes the compiled graph call
the eager random ops, in the same order, and both runs then draw the same masks. The tests
leave inductor's global setting alone (off), so they check the training code's own setting.
"""
import os
import sys

import pytest
import torch

import test_svllreid
import train_svllreid
from config import ConfigError, load_config
from config.resume import RESUME_SAFE_KEYS
from datasets import make_dataloader
from loss import SimCLRLoss, make_loss
from model import make_model
from processor.compiled import compile_model, fixed_batch_encode, is_compiled, pad_rows
from processor.inference import extract_features
from processor.processor_stage2 import stage2_forward_loss
from tests.helpers import (
    DEMO,
    TINY,
    Interrupt,
    final_weights,
    fixed_stage_inputs,
    interrupt_after,
    one_step_each_stage,
    opts_of,
    run_gloo,
    tiny_cfg,
    train_argv,
)
from utils.checkpoint import load_model_weights, unwrap
from utils.misc import set_seed

CPU = torch.device("cpu")
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
GRAD_RTOL = 1e-4      # of the largest gradient entry of the tensor
GRAD_NOISE = 1e-6     # a gradient entry this small may be rounding noise of a true 0
RN50 = ["MODEL.NAME", "RN50", "MODEL.SIE_CAMERA", "False", "MODEL.STRIDE_SIZE", "[16, 16]",
        "MODEL.CLIP_ARCH.VISION_WIDTH", "8", "MODEL.CLIP_ARCH.VISION_LAYERS", "1"]


# ----------------------------------------------------------------------------- the switch
def test_compile_switch_is_a_checked_boolean_and_resume_safe():
    assert load_config(DEMO).SOLVER.COMPILE is False
    assert load_config(DEMO, ["SOLVER.COMPILE", "yes"]).SOLVER.COMPILE is True
    assert load_config(DEMO, ["SOLVER.COMPILE", "True"]).SOLVER.COMPILE is True
    with pytest.raises(ConfigError, match="SOLVER.COMPILE"):
        load_config(DEMO, ["SOLVER.COMPILE", "sometimes"])
    # how a run is executed, not what it computes: a run may be resumed with compile on or off
    assert "SOLVER.COMPILE" in RESUME_SAFE_KEYS


def test_a_machine_without_a_compiler_is_one_line(monkeypatch, tiny_root, tmp_path, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert train_svllreid.main(train_argv(tiny_root, tmp_path / "run", "SOLVER.COMPILE", "True")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "C++ compiler" in err and "SOLVER.COMPILE" in err


def test_pad_rows_repeats_the_last_row_of_batch_tensors_only():
    batch = {"img": torch.arange(6.).view(3, 2), "pid": torch.tensor([4, 5, 6]), "path": ["a", "b", "c"],
             "scale": torch.tensor(2.0)}
    padded, n = pad_rows(batch, 5)
    assert n == 3 and padded["img"].tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert padded["pid"].tolist() == [4, 5, 6, 6, 6]
    assert padded["path"] is batch["path"] and padded["scale"] is batch["scale"]
    assert pad_rows(batch, 3) == (batch, 3)


def test_an_eager_model_encodes_unpadded():
    model = torch.nn.Linear(2, 2)

    def encode(net, batch):
        return net(batch["x"])
    assert not is_compiled(model) and fixed_batch_encode(encode, model, 8, "batch") is encode


# ----------------------------------------------------------------------------- one step of each stage
def _compare(cfg):
    eager_losses, eager_text, eager, start, eager_grads = one_step_each_stage(cfg, compiled=False)
    assert not torch._inductor.config.fallback_random       # compile_model's own setting, not the test's
    losses, text, model, _, grads = one_step_each_stage(cfg, compiled=True)
    assert is_compiled(model) and not is_compiled(eager)
    for stage in ("stage1", "stage2"):
        assert losses[stage].keys() == eager_losses[stage].keys()
        for k, v in eager_losses[stage].items():
            assert losses[stage][k] == pytest.approx(v, rel=LOSS_RTOL), (stage, k)
    torch.testing.assert_close(text, eager_text, rtol=0, atol=WEIGHT_ATOL)
    assert grads.keys() == eager_grads.keys() and "prompt_learner.cls_ctx" in grads
    ours, ref = model.state_dict(), eager.state_dict()
    assert list(ours) == list(ref)                        # the same keys, in the same order: no _orig_mod.
    worst, noise = 0.0, 0
    for k, w in ref.items():
        if not w.is_floating_point():
            assert torch.equal(ours[k], w), k
            continue
        g = eager_grads.get(k)
        if g is None:                                     # not trained (text side, BN statistics): as eager
            torch.testing.assert_close(ours[k], w, rtol=0, atol=WEIGHT_ATOL, msg=k)
            continue
        g, effective = g
        scale = g.abs().max().item()
        torch.testing.assert_close(grads[k][0], g, rtol=0, atol=GRAD_RTOL * scale + GRAD_NOISE, msg=k)
        # Adam's first step moves each weight by about lr x sign(gradient + decay x weight): where
        # that is 0 (the key bias of attention, a bias right before BatchNorm: true gradient 0) or
        # nearly (decay and gradient cancelling) the sign is rounding noise in eager and compiled
        # alike; those entries are held to their gradient above
        sure = effective.abs() > max(GRAD_NOISE, GRAD_RTOL * effective.abs().max().item())
        noise += int((~sure).sum())
        worst = max(worst, (ours[k] - w)[sure].abs().max().item() if sure.any() else 0.0)
    assert worst <= WEIGHT_ATOL, worst
    assert noise < 0.05 * sum(g.numel() for g, _ in eager_grads.values())
    moved = (ours["prompt_learner.cls_ctx"] - start).abs().max().item()
    assert moved > 100 * WEIGHT_ATOL         # the step moved the weights far beyond the tolerance
    return model, eager


@pytest.mark.slow
def test_compiled_vit_steps_equal_eager_and_its_weights_load_into_eager_code(tiny_root, tmp_path):
    cfg = tiny_cfg(tiny_root, tmp_path)
    model, eager = _compare(cfg)
    # evaluation: the compiled features equal the eager ones, the partial last batch included
    cfg = tiny_cfg(tiny_root, tmp_path, "TEST.IMS_PER_BATCH", "5")
    val = make_dataloader(cfg).val
    assert len(val.dataset) % 5
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    ours = extract_features(cfg, model, val, CPU)
    assert torch._dynamo.utils.counters["frames"]["ok"] - frames == 1   # one graph: the last batch was padded
    ref = extract_features(cfg, eager, val, CPU)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-4)
    assert torch.equal(ours[1], ref[1]) and torch.equal(ours[2], ref[2])
    # the compiled model's state dict loads strictly into an eager model
    fresh = make_model(cfg, 8, 2, 1)
    load_model_weights(fresh, model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_compiled_rn50_steps_equal_eager(tiny_root, tmp_path):
    _compare(tiny_cfg(tiny_root, tmp_path, *RN50))


# ----------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def compiled_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    cfg = tiny_cfg(tiny_root, out, "SOLVER.COMPILE", "True")
    return cfg, out, train_svllreid.train(cfg)


@pytest.mark.slow
def test_compiled_run_logs_writes_eager_files_and_evaluates_the_same(compiled_run, finished_run, tmp_path):
    cfg, out, result = compiled_run
    with open(os.path.join(out, "train_log.txt")) as f:
        log = f.read()
    assert log.count("the model is compiled with torch.compile") == 1
    for step in ("stage-1 step", "stage-2 step", "evaluation batch", "stage-1 feature-caching batch"):
        assert log.count(f"the first compiled {step} took") == 1, step
    # the weights files and last.pth hold the eager keys (a finished eager run of the same config)
    eager = final_weights(finished_run)
    assert list(final_weights(out)) == list(eager)
    state = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])
    load_model_weights(make_model(cfg, 8, 2, 1), os.path.join(out, "last.pth"))
    # the eager test script on the compiled run's checkpoint gives the compiled evaluation's figures
    weight = os.path.join(out, "ViT-B-16_2.pth")
    assert test_svllreid.main(["--config_file", DEMO, *opts_of(cfg), "TEST.WEIGHT", weight,
                               "OUTPUT_DIR", str(tmp_path / "eval")]) == 0
    import json
    with open(tmp_path / "eval" / "results.json") as f:
        evaluated = json.load(f)
    assert evaluated["mAP"] == pytest.approx(result["trained"]["mAP"], abs=1e-6)
    assert evaluated["cmc"] == pytest.approx(result["trained"]["cmc"], abs=1e-6)


@pytest.mark.slow
def test_a_compiled_run_is_the_eager_run(compiled_run, tiny_root, tmp_path):
    """The same tiny run (2 + 2 epochs, same seed) eager and compiled: the same stage-1 prompt masks
    (inductor's own random numbers gave a first stage-1 SSL loss of 3.10 against 2.37 here), every
    logged loss within float rounding, final weights within 1e-3 (measured: 1.5e-4 after 4 epochs
    of Adam, whose normalised steps carry rounding differences forward) and the same mAP."""
    import json
    assert not torch._inductor.config.fallback_random       # the training code's own setting
    cfg, out, result = compiled_run
    eager = train_svllreid.train(tiny_cfg(tiny_root, tmp_path))

    def losses(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        return [(r["stage"], r["epoch"], k, r[k]) for r in recs if r.get("kind") == "period"
                for k in ("loss", "i2t", "t2i", "ssl") if k in r]
    ours, ref = losses(out), losses(tmp_path)
    assert [x[:3] for x in ours] == [x[:3] for x in ref] and any(x[2] == "ssl" for x in ref)
    for (stage, epoch, key, v), (_, _, _, w) in zip(ours, ref):
        assert v == pytest.approx(w, rel=LOSS_RTOL, abs=1e-5), (stage, epoch, key)
    a, b = final_weights(out), final_weights(tmp_path)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].is_floating_point())
    assert worst <= 1e-3, worst
    assert result["trained"]["mAP"] == pytest.approx(eager["trained"]["mAP"], abs=1e-6)


@pytest.mark.slow
def test_compiled_resume_is_exact(compiled_run, tiny_root, tmp_path, monkeypatch):
    """A compiled run interrupted after stage-2 epoch 1 and resumed (compiled) ends where the straight
    compiled run ends."""
    cfg = tiny_cfg(tiny_root, tmp_path, "SOLVER.COMPILE", "True")
    with monkeypatch.context() as m:
        interrupt_after(m, 2, 1)
        with pytest.raises(Interrupt):
            train_svllreid.train(cfg)
    resumed = train_svllreid.train(cfg, resume=True)
    a, b = final_weights(compiled_run[1]), final_weights(tmp_path)
    assert list(a) == list(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    assert resumed["trained"]["mAP"] == compiled_run[2]["trained"]["mAP"]


# ----------------------------------------------------------------------------- DDP
def _ddp_cfg(root):
    # batch-hard triplet mining is per process, so it is off (as in tests/test_distributed.py)
    return load_config(DEMO, ["DATASETS.ROOT_DIR", root, *TINY, "MODEL.TRIPLET_LOSS_WEIGHT", "0"])


def _fresh_stage2_model(cfg):
    set_seed(0)
    model = make_model(cfg, num_class=8, camera_num=2, view_num=1)
    model.set_stage(2)
    return model


def _sgd_step(cfg, net, batch):
    """One SGD step of the real stage-2 loss; BatchNorm on its running statistics (per-process
    batch statistics would differ from one process's)."""
    model = unwrap(net)
    net.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss_fn, _ = make_loss(cfg, 8)
    text = torch.randn(8, model.in_planes_proj, generator=torch.Generator().manual_seed(7))
    loss, _, _ = stage2_forward_loss(cfg, net, batch, text, loss_fn, SimCLRLoss())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ddp_worker(rank, world, root):
    from torch.nn.parallel import DistributedDataParallel
    cfg = _ddp_cfg(root)
    model = _fresh_stage2_model(cfg)
    ddp = DistributedDataParallel(compile_model(model, CPU))     # compiled, then wrapped
    assert unwrap(ddp) is model and is_compiled(ddp)
    _, _, batch = fixed_stage_inputs(model.in_planes_proj)
    n = len(batch["img"]) // world
    flat = _sgd_step(cfg, ddp, {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()})
    return {"params": flat, "keys": list(model.state_dict())}


@pytest.mark.slow
def test_ddp_over_a_compiled_model_equals_one_eager_process(tiny_root, tmp_path):
    """Two gloo processes, each DDP(compiled model) on half the batch: after one step both ranks hold
    the weights of one eager process's step on the whole batch, and the plain model's keys."""
    ranks = run_gloo(_ddp_worker, (tiny_root,), tmp_path)
    rank0, rank1 = (r["params"] for r in ranks)
    assert torch.equal(rank0, rank1), "the ranks differ after one step"
    cfg = _ddp_cfg(tiny_root)
    eager = _fresh_stage2_model(cfg)
    start = torch.cat([p.detach().reshape(-1) for p in eager.parameters()])
    single = _sgd_step(cfg, eager, fixed_stage_inputs(eager.in_planes_proj)[2])
    assert (single - start).abs().max() > 1e-3                   # the step changed the weights
    assert (rank0 - single).abs().max() <= WEIGHT_ATOL, (rank0 - single).abs().max()
    assert all(r["keys"] == list(eager.state_dict()) for r in ranks)


# ----------------------------------------------------------------------------- the bench
@pytest.mark.slow
def test_train_step_bench_runs_on_cpu_and_prints_every_row(tmp_path):
    """bench/train_step.py on the CPU (tiny ViT, ``--no-compile``): every eager row is measured and printed.

    The compiled rows run the same code through ``compile_model``, whose steps the tests above
    compare with eager; compiling them again here would cost minutes on a cold inductor cache."""
    import json
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, SVLLREID_PROGRESS="off")
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "train_step.py"), "--device", "cpu",
                           "--models", "vit", "--no-compile", "--json", str(tmp_path / "rows.json")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    measured = {(r["row"], r["variant"]) for r in rows if r["per_s"] and r["per_s"] > 0}
    for row in ("stage-1 step", "stage-2 step", "inference", "stage-2 epoch", "feature extraction"):
        assert (row, "eager") in measured and (row, "compiled") not in measured, row
    assert {("loader alone", "per worker, test"), ("loader alone", "per worker, stage2")} <= measured
    steps = [r for r in rows if r["row"] in ("stage-1 step", "stage-2 step", "inference") and r["variant"] == "eager"]
    assert all(r["gflop_per_sample"] > 0 and r["peak_mib"] is not None for r in steps)
    assert all(r["ratio"] > 0 for r in rows if r["row"] in ("stage-2 epoch", "feature extraction")
               and r["variant"] == "eager")
    out = proc.stdout
    for line in ("| ViT-B-16 | stage-1 step | eager |", "| ViT-B-16 | stage-2 step | eager |",
                 "| ViT-B-16 | inference | eager |", "| - | loader alone | per worker, stage2 |",
                 "| ViT-B-16 | stage-2 epoch | eager |", "| ViT-B-16 | feature extraction | eager |"):
        assert line in out, line
    assert "peak unknown" in out and "0 row(s) failed" in out
