"""The CUDA acceptance checks of ``make gpu-check`` (sized for under 5 minutes on one GPU; not yet timed on one).

Each test names the property it holds on the GPU. Tolerances: where fp16 autocast runs (the
training steps, as training runs them), compiled and eager differ by fp16 rounding, so losses
are held within 2% and features within 2e-2 absolute (cosine similarity above 0.999); float32
checks (the device transform) are bit for bit.
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from config import load_config
from datasets import make_dataloader
from datasets.device_transforms import ERASE_AREA, DeviceTransform, erase_boxes, random_erase
from loss import make_loss, make_ssl_loss
from model import make_model, move_model
from processor.amp import autocast, make_scaler, optimizer_step
from processor.batches import device_transform_of, to_device
from processor.compiled import compile_counts, compile_model
from processor.processor_stage2 import stage2_forward_loss
from solver import make_optimizer_2stage
from tests.gpu.conftest import check_device
from tests.helpers import (
    ROOT,
    Interrupt,
    fixed_stage_inputs,
    interrupt_after,
    one_step_each_stage,
    synthetic_set,
    tiny_cfg,
)
from utils.checkpoint import load_model_weights

if check_device() is None:
    pytest.skip("no CUDA GPU: tests/gpu is make gpu-check's suite", allow_module_level=True)

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
LOSS_RTOL, FEAT_ATOL = 2e-2, 2e-2
# full widths, reduced depth: the real kernels at a fraction of the time
FULL_WIDTH = {"vit": ["MODEL.CLIP_ARCH.EMBED_DIM", "0", "MODEL.CLIP_ARCH.VISION_WIDTH", "0",
                      "MODEL.CLIP_ARCH.VISION_PATCH_SIZE", "0", "MODEL.CLIP_ARCH.VISION_LAYERS", "2",
                      "MODEL.CLIP_ARCH.TEXT_WIDTH", "0", "MODEL.CLIP_ARCH.TEXT_HEADS", "0",
                      "MODEL.CLIP_ARCH.TEXT_LAYERS", "2", "MODEL.STRIDE_SIZE", "[12, 12]"],
              "rn50": ["MODEL.NAME", "RN50", "MODEL.SIE_CAMERA", "False", "MODEL.STRIDE_SIZE", "[16, 16]",
                       "MODEL.CLIP_ARCH.EMBED_DIM", "0", "MODEL.CLIP_ARCH.VISION_WIDTH", "0",
                       "MODEL.CLIP_ARCH.VISION_LAYERS", "1", "MODEL.CLIP_ARCH.TEXT_WIDTH", "0",
                       "MODEL.CLIP_ARCH.TEXT_HEADS", "0", "MODEL.CLIP_ARCH.TEXT_LAYERS", "2"]}
PUBLISHED = {"vit": "configs/person/vit_svllreid.yml", "rn50": "configs/person/cnn_svllreid.yml"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return synthetic_set(tmp_path_factory.mktemp("gpu_data"))


def _cfg(root: str, out: object, device: torch.device, *opts: str):
    return tiny_cfg(root, out, "MODEL.DEVICE", device.type, *opts)


# ----------------------------------------------------------------------------- the image pipeline
def test_device_transform_equals_the_cpu_transform_and_torchvision(device):
    from torchvision.transforms import Normalize, ToTensor
    x = torch.randint(0, 256, (6, 3, 64, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = DeviceTransform(MEAN, STD)
    on_device = t.image(x.to(device)).cpu()
    on_cpu = t.image(x)
    tv = torch.stack([Normalize(MEAN, STD)(ToTensor()(Image.fromarray(img.permute(1, 2, 0).numpy()))) for img in x])
    assert torch.equal(on_cpu, tv)
    assert torch.equal(on_device, on_cpu)       # bit for bit on the device too


def test_erasing_matches_its_boxes_leaves_the_rest_and_repeats_per_seed_epoch_rank(device):
    b, h, w = 256, 64, 32
    x = torch.randn(b, 3, h, w, device=device)
    gen = torch.Generator(device=device).manual_seed(7)
    clone = torch.Generator(device=device)
    clone.set_state(gen.get_state())
    out = random_erase(x.clone(), 0.5, ERASE_AREA, gen)
    top, left, bh, bw = (v.cpu() for v in erase_boxes(b, h, w, 0.5, ERASE_AREA, clone, device))
    inside = torch.zeros(b, 1, h, w, dtype=torch.bool)
    for i in range(b):
        inside[i, :, top[i]:top[i] + bh[i], left[i]:left[i] + bw[i]] = True
    inside = inside.expand(-1, 3, -1, -1).to(device)
    assert torch.equal(out[~inside], x[~inside])                      # outside the boxes: untouched
    erased = out[inside]
    assert 0.3 < (bh > 0).float().mean() < 0.7 and erased.numel() > 10_000
    assert (erased != x[inside]).float().mean() > 0.999                # inside: new values
    assert abs(erased.mean().item()) < 0.05 and abs(erased.std().item() - 1) < 0.05     # N(0, 1)
    # the same (seed, epoch, rank) erases the same pixels with the same values
    t = DeviceTransform(MEAN, STD, 0.5, {"img": ERASE_AREA})
    u8 = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, device=device)
    runs = []
    for _ in range(2):
        t.set_epoch(3, 5, 1)
        runs.append(t.image(u8))
    t.set_epoch(3, 6, 1)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(t.image(u8), runs[0])


def test_loader_batches_are_pinned(root, tmp_path, device, cuda_only):
    data = make_dataloader(_cfg(root, tmp_path, device, "DATALOADER.NUM_WORKERS", "2"))
    for name in ("train_stage2", "train_stage1", "val"):
        batch = next(iter(getattr(data, name)))
        assert batch["img"].is_pinned(), name


# ----------------------------------------------------------------------------- host synchronisations
def _stage2_step(cfg, device):
    """A stage-2 step as the training loop runs it, on a real loader batch; returns (step, batch fn)."""
    data = make_dataloader(cfg)
    model = move_model(make_model(cfg, data.num_classes, data.camera_num, data.view_num), device)
    model.set_stage(2)
    model.train()
    loss_fn, center = make_loss(cfg, data.num_classes, feat_dim=model.feature_dims[0])
    opt, _ = make_optimizer_2stage(cfg, model, center)
    scaler, ssl = make_scaler(device), make_ssl_loss(cfg)
    cpu_batch = next(iter(data.train_stage2))
    prepare = device_transform_of(data.train_stage2)

    def move():
        return to_device(cpu_batch, device, prepare)

    def step():
        batch = move()
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss, parts, _ = stage2_forward_loss(cfg, model, batch, None, loss_fn, ssl)
        optimizer_step(scaler, loss, opt)
        return loss
    return step, move


def test_stage2_step_syncs_are_listed_and_the_batch_transfer_has_none(root, tmp_path, device, cuda_only, report):
    step, move = _stage2_step(_cfg(root, tmp_path, device), device)
    step()                                   # lazy state (optimiser, scaler, statistics) first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the batch's copy and its device transform: no sync
    try:
        move()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in caught
             if "synchroniz" in str(w.message).lower()]
    report.append(f"* stage-2 step: {len(syncs)} host synchronisation(s): {', '.join(syncs) or 'none'}")


def test_stage1_forward_has_no_sync(root, tmp_path, device, cuda_only):
    from loss import SimCLRLoss, SupConLoss
    from processor.processor_stage1 import set_stage1_modes, stage1_forward_loss
    cfg = _cfg(root, tmp_path, device)
    model = move_model(make_model(cfg, 8, 2, 1), device)
    model.set_stage(1)
    set_stage1_modes(model)
    feats, labels, _ = fixed_stage_inputs(model.in_planes_proj, device=device)
    unique = torch.unique(labels.cpu()).to(device)
    args = (model, feats, labels, SupConLoss(), SimCLRLoss(0.5, gather=False), 1.0, device, unique)
    stage1_forward_loss(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stage1_forward_loss(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------- fp16 and flash attention
@pytest.mark.parametrize("key", ["vit", "rn50"])
def test_fp16_forward_under_flash_attention_equals_the_math_backend(key, device, cuda_only):
    cfg = load_config(os.path.join(ROOT, PUBLISHED[key]), ["MODEL.CLIP_INIT", "random", "MODEL.DEVICE", "cuda"])
    torch.manual_seed(0)
    model = move_model(make_model(cfg, 751, 6, 1), device).eval()
    if key == "rn50":      # move_model puts the convolutions in cuDNN's tensor-core layout
        assert model.image_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    h, w = cfg.INPUT.SIZE_TEST
    x = torch.randn(16, 3, h, w, device=device)
    cams = torch.arange(16, device=device) % 6
    feats = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
        with torch.no_grad(), autocast(device), sdpa_kernel([backend]):
            feats[name] = model(x, cam_label=cams).float()
    assert torch.isfinite(feats["flash"]).all()
    cos = F.cosine_similarity(feats["flash"], feats["math"]).min().item()
    assert cos > 0.999, cos


def test_flop_counter_counts_attention(device, cuda_only):
    q, k, v = (torch.randn(2, 12, 129, 64, device=device, dtype=torch.float16) for _ in range(3))
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * 2 * 12 * 129 * 129 * 64     # QK^T and AV, 2 FLOPs per MAC


# ----------------------------------------------------------------------------- compiled against eager
@pytest.mark.parametrize("key", ["vit", "rn50"])
def test_compiled_equals_eager_after_a_step_of_each_stage_and_for_features(key, root, tmp_path, device, report):
    cfg = _cfg(root, tmp_path, device, *FULL_WIDTH[key])
    eager_losses, eager_text, eager, _, _ = one_step_each_stage(cfg, compiled=False, device=device)
    torch._dynamo.reset()
    frames, breaks = compile_counts()
    losses, text, model, _, _ = one_step_each_stage(cfg, compiled=True, device=device)
    for stage in ("stage1", "stage2"):
        for name, value in eager_losses[stage].items():
            assert losses[stage][name] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-3), (stage, name)
    torch.testing.assert_close(text, eager_text, rtol=0, atol=FEAT_ATOL)
    _, _, batch = fixed_stage_inputs(model.in_planes_proj, device=device)
    with torch.no_grad(), autocast(device):
        ours = model.eval()(batch["img"], cam_label=batch["camid"]).float()
        ref = eager.eval()(batch["img"], cam_label=batch["camid"]).float()
    assert F.cosine_similarity(ours, ref).min().item() > 0.999
    new_frames, new_breaks = compile_counts()
    report.append(f"* compiled {key} (full widths, 2 layers): {new_frames - frames} frame(s) compiled, "
                  f"{new_breaks - breaks} graph break(s) for one step of each stage and evaluation")
    assert new_breaks == breaks, "a graph break in the compiled steps"
    # four kinds of call (stage-1 step, stage-2 text features, stage-2 step, evaluation), each
    # compiled once (4 on the CPU): more would be recompiles
    assert new_frames - frames <= 4, new_frames - frames


def test_deterministic_mode_repeats_bit_for_bit_and_its_cost(root, tmp_path, device, report):
    cfg = _cfg(root, tmp_path, device, *FULL_WIDTH["vit"])
    try:
        runs = [one_step_each_stage(cfg, compiled=False, device=device, deterministic=True) for _ in range(2)]
        a, b = runs[0][2].state_dict(), runs[1][2].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
        seconds = {}
        for deterministic in (False, True):
            from utils.misc import set_seed
            set_seed(0, deterministic)
            step, _ = _stage2_step(_cfg(root, tmp_path, device, *FULL_WIDTH["vit"], "SOLVER.STAGE2.IMS_PER_BATCH",
                                        "8"), device)
            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[deterministic] = (time.perf_counter() - start) / 10
        report.append(f"* SOLVER.DETERMINISTIC: a stage-2 step (ViT full widths, 2 layers, batch 8) takes "
                      f"{1000 * seconds[True]:.1f} ms against {1000 * seconds[False]:.1f} ms "
                      f"({seconds[True] / seconds[False]:.2f}x)")
    finally:
        from utils.misc import set_seed
        set_seed(0, False)


# ----------------------------------------------------------------------------- checkpoints and resume
def _interrupted_then_resumed(cfg_first, cfg_resume, monkeypatch):
    """Train ``cfg_first`` until stage-2 epoch 1 is saved, then resume with ``cfg_resume``."""
    import train_svllreid
    with monkeypatch.context() as m:
        interrupt_after(m, 2, 1)
        with pytest.raises(Interrupt):
            train_svllreid.train(cfg_first)
    return train_svllreid.train(cfg_resume, resume=True)


@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_across_devices_and_a_cuda_checkpoint_on_the_cpu(first, then, root, tmp_path, device, monkeypatch):
    on = {"cuda": device, "cpu": torch.device("cpu")}            # a dry run on the CPU: CPU -> CPU
    out = tmp_path / "run"
    result = _interrupted_then_resumed(_cfg(root, out, on[first]), _cfg(root, out, on[then]), monkeypatch)
    assert 0 <= result["trained"]["mAP"] <= 1
    for name in ("ViT-B-16_stage1_2.pth", "ViT-B-16_2.pth", "last.pth"):
        state = torch.load(out / name, weights_only=True)        # no map_location: every tensor on the CPU
        tensors = state["model"] if name == "last.pth" else state
        assert all(t.device.type == "cpu" for t in tensors.values() if torch.is_tensor(t)), name
    model = make_model(_cfg(root, out, torch.device("cpu")), 8, 2, 1)
    load_model_weights(model, str(out / "ViT-B-16_2.pth"))


# ----------------------------------------------------------------------------- DDP
def test_nccl_ddp_over_the_compiled_model_steps_like_one_eager_process(root, tmp_path, device, cuda_only):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    cfg = _cfg(root, tmp_path, device, "MODEL.TRIPLET_LOSS_WEIGHT", "0")
    _, _, batch = fixed_stage_inputs(64, device=device)

    def two_steps(compiled_ddp: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = move_model(make_model(cfg, 8, 2, 1), device)
        model.set_stage(2)
        model.train()
        net = DistributedDataParallel(compile_model(model, device), device_ids=[device.index or 0]) \
            if compiled_ddp else model
        loss_fn, _ = make_loss(cfg, 8, feat_dim=model.feature_dims[0])
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss, _, _ = stage2_forward_loss(cfg, net, batch, None, loss_fn, make_ssl_loss(cfg))
            loss.backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = two_steps(True)
    finally:
        dist.destroy_process_group()
    eager = two_steps(False)
    assert (ddp - eager).abs().max().item() < 1e-3
    assert np.isfinite(ddp.cpu().numpy()).all()
