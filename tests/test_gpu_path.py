"""The GPU path's fixes, checked where a CPU can check them (``tests/gpu/`` checks the rest on a GPU).

What is shown here: the CUDA compile pre-check, the recompile limit (an error, never a silent
eager fall-back), the prompt ``mix`` augmentation as one graph, the stage-1 unique labels from
the host (same values, one graph for every count), the SyncBatchNorm + compile refusal, loaders
pinned only for CUDA runs, the device transform's statistics made once per device, and the
deterministic mode's switches.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import processor.compiled as compiled_mod
from config import ConfigError, load_config
from datasets import make_dataloader
from datasets.device_transforms import DeviceTransform
from model import augment_prompts, make_model
from processor.compiled import check_compile_support, compile_model
from tests.helpers import DEMO, tiny_cfg
from utils import device_info
from utils.device_info import match_peak
from utils.errors import UserError
from utils.misc import CUBLAS_WORKSPACE, set_seed

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- compile
def test_compile_on_cuda_needs_a_c_compiler_and_the_python_headers(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    cuda = torch.device("cuda")          # the check reads the machine, not the GPU
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(UserError, match="C compiler for Triton"):
        check_compile_support(cuda)
    monkeypatch.delenv("CC")
    monkeypatch.setattr(device_info.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    with pytest.raises(UserError, match="Python headers") as e:
        check_compile_support(cuda)
    assert "\n" not in str(e.value) and str(tmp_path / "Python.h") in str(e.value)


def test_syncbatchnorm_under_compile_is_refused():
    opts = ["SOLVER.COMPILE", "True", "MODEL.SSL_SYNC_BN", "True", "MODEL.DIST_TRAIN", "True"]
    with pytest.raises(ConfigError, match="SSL_SYNC_BN.*COMPILE"):
        load_config(DEMO, opts)
    load_config(DEMO, opts[:2] + ["MODEL.DIST_TRAIN", "True"])     # each alone is fine
    load_config(DEMO, opts[2:])


class _ByInt(nn.Module):
    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x * k          # a Python int: under static shapes, every value is its own graph


@pytest.mark.slow
def test_past_the_recompile_limit_is_one_line_not_a_silent_eager_run(monkeypatch):
    monkeypatch.setattr(compiled_mod, "RECOMPILE_LIMIT", 2)
    torch._dynamo.reset()
    # Dynamo's own settings as a fresh process has them, but a limit of 2 (put back afterwards)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=False):
        net = compile_model(_ByInt(), CPU)
        assert torch._dynamo.config.fail_on_recompile_limit_hit
        assert net(torch.ones(2), 1).tolist() == [1, 1] and net(torch.ones(2), 2).tolist() == [2, 2]
        with pytest.raises(UserError, match="more than 2 compilations") as e:
            net(torch.ones(2), 3)        # Dynamo's default would run this eagerly without a word
    assert "\n" not in str(e.value) and "SOLVER.COMPILE False" in str(e.value)
    torch._dynamo.reset()


def test_mix_equals_roll_by_the_drawn_shift():
    x = torch.randn(6, 77, 8)
    for seed in range(5):
        torch.manual_seed(seed)
        shift = int(torch.randint(1, 6, (1,)))
        torch.manual_seed(seed)
        assert torch.equal(augment_prompts(x, "mix", 0.25), 0.75 * x + 0.25 * torch.roll(x, shift, dims=0))


@pytest.mark.slow
def test_mix_compiles_as_one_graph_for_every_shift():
    """No graph break, and one graph serves every draw, compiled as ``SOLVER.COMPILE`` compiles
    (before: a host read of the shift broke the graph, and each distinct shift compiled again)."""
    torch._dynamo.reset()
    x = torch.randn(6, 77, 8)
    fn = torch.compile(lambda p: augment_prompts(p, "mix", 0.25), dynamic=False)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    with torch._inductor.config.patch(fallback_random=True):
        for seed in range(6):
            torch.manual_seed(seed)
            out = fn(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(out, augment_prompts(x, "mix", 0.25), rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert sum(counters["graph_break"].values()) == breaks
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- stage 1's unique labels
def _stage1_model(tmp_path, *opts):
    cfg = tiny_cfg(str(tmp_path), tmp_path, *opts)
    torch.manual_seed(0)
    model = make_model(cfg, num_class=8, camera_num=2, view_num=1)
    model.set_stage(1)
    model.train()
    return model


def test_stage1_with_unique_labels_from_the_host_equals_the_model_own(tmp_path):
    model = _stage1_model(tmp_path)
    label = torch.tensor([3, 1, 3, 5, 1, 6])
    torch.manual_seed(2)
    own = model(label=label, mode="stage1")
    torch.manual_seed(2)
    given = model(label=label, mode="stage1", unique_label=torch.unique(label))
    assert torch.equal(own["text_features"], given["text_features"])
    assert own["ssl"].keys() == given["ssl"].keys()
    for k in own["ssl"]:
        assert torch.equal(own["ssl"][k], given["ssl"][k]), k


@pytest.mark.slow
def test_compiled_stage1_compiles_once_for_every_number_of_identities(tmp_path):
    from loss import SimCLRLoss, SupConLoss
    from processor.processor_stage1 import stage1_forward_loss
    torch._dynamo.reset()
    model = compile_model(_stage1_model(tmp_path), CPU)
    feats = torch.randn(6, model.in_planes_proj)
    batches = [torch.tensor(b) for b in
               ([0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 3], [7, 7, 7, 6, 6, 5])]
    frames = []
    with torch._inductor.config.patch(fallback_random=True):
        for y in batches:               # 6, 3, 4 and 3 identities
            stage1_forward_loss(model, feats, y, SupConLoss(), SimCLRLoss(0.5, gather=False), 1.0, CPU,
                                torch.unique(y))
            frames.append(counters["frames"]["ok"])
    # the first batch compiles; a second count of identities may compile the dynamic-size graph
    # once; every later count reuses it
    assert frames[2] == frames[1] and frames[3] == frames[2], frames
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- loaders and the device transform
def test_loaders_pin_memory_only_for_a_cuda_run(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a machine with a GPU
    for device, pinned in (("cpu", False), ("cuda", True)):
        data = make_dataloader(tiny_cfg(tiny_root, tmp_path, "MODEL.DEVICE", device))
        assert [ld.pin_memory for ld in (data.train_stage2, data.train_stage1, data.val)] == [pinned] * 3, device


def test_device_transform_makes_its_statistics_once_per_device():
    t = DeviceTransform([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    mean, std = t.stats(CPU)
    assert t.stats(CPU)[0] is mean and t.stats(CPU)[1] is std
    assert mean.dtype == torch.float32 and mean.tolist() == torch.tensor([0.5, 0.4, 0.3]).tolist()
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.equal(t.image(x), ref)
    assert t.__getstate__()["_stats"] == {}       # device tensors do not travel to loader workers


# ----------------------------------------------------------------------------- deterministic mode
@pytest.fixture
def restore_determinism():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


def test_seeding_sets_cudnn_as_published_and_the_deterministic_mode_on_request(restore_determinism, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_seed(0)
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic     # as the published code
    assert not torch.are_deterministic_algorithms_enabled()
    set_seed(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    import os
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert load_config(DEMO, ["SOLVER.DETERMINISTIC", "True"]).SOLVER.DETERMINISTIC is True


@pytest.mark.slow
def test_a_deterministic_run_trains_on_the_cpu(tiny_root, tmp_path, restore_determinism):
    """Every operation of both stages and the evaluation has a deterministic version on the CPU."""
    import train_svllreid
    cfg = tiny_cfg(tiny_root, tmp_path, "SOLVER.DETERMINISTIC", "True", "SOLVER.STAGE1.MAX_EPOCHS", "1",
                   "SOLVER.STAGE2.MAX_EPOCHS", "1", "SOLVER.STAGE2.EVAL_PERIOD", "1", "SOLVER.STAGE2.STEPS", "[1]")
    out = train_svllreid.train(cfg)
    assert torch.are_deterministic_algorithms_enabled() and 0 <= out["trained"]["mAP"] <= 1


# ----------------------------------------------------------------------------- the bench's device peak
def test_a_mig_slice_gets_its_share_of_the_peak():
    name, peak, source = match_peak("NVIDIA H100 80GB HBM3", 132)
    assert peak == 989.4 and "MIG" not in name
    name, peak, source = match_peak("NVIDIA H100 80GB HBM3", 16)       # a 1g slice: 16 of 132 SMs
    assert peak == pytest.approx(989.4 * 16 / 132) and "MIG slice" in name and "16/132" in source
    assert match_peak("NVIDIA H100 PCIe", 114)[1] is None                 # not the SXM part: peak unknown
