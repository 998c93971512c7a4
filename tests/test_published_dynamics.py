"""Training dynamics as the published code has them, each written from the published behaviour:

- the text SSL head (train mode in stage 1) normalises each augmented prompt view on its own;
- the image SSL head gets Kaiming (fan-in) Linear weights, PyTorch-default Linear biases and
  uniform [0, 1) BatchNorm affine; the text head keeps PyTorch's default initialisation;
- the test transform (evaluation and the stage-1 feature cache) resizes bilinearly;
- the vision-SSL views erase 33% of the image.

Each test also checks that the behaviour it pins is distinguishable from the alternative it
replaced, so that it fails if that alternative comes back.
"""
import copy
import importlib
import math

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from datasets import make_dataloader
from datasets.transforms import build_ssl_transform, build_transforms
from loss import SimCLRLoss, SupConLoss
from model import make_model
from processor.processor_stage1 import set_stage1_modes
from solver import make_optimizer_1stage
from tests.helpers import tiny_cfg
from utils.misc import set_seed

make_model_mod = importlib.import_module("model.make_model")   # the module (the package re-exports the function)


# ----------------------------------------------------------------------------- text SSL head per view
class FixedMasks:
    """Stands in for the prompt augmentation: view k is the prompts times a fixed 0/1 mask."""

    def __init__(self, masks):
        self.masks, self.calls = masks, 0

    def __call__(self, prompts, method, scale):
        mask = self.masks[self.calls % 2]
        self.calls += 1
        return prompts * mask


def _reference_stage1_step(model, labels, img_f, masks, ssl_weight, temperature):
    """One stage-1 loss as the published model computes it: each view through the text encoder
    and then the text SSL head separately (two BatchNorm batches), SupCon both ways."""
    pl, enc = model.prompt_learner, model.text_encoder
    tok = pl.tokenized_prompts

    def prompts(lab):
        b = lab.shape[0]
        return torch.cat([pl.token_prefix.expand(b, -1, -1), pl.cls_ctx[lab], pl.token_suffix.expand(b, -1, -1)], 1)

    text_f = enc(prompts(labels), tok)
    supcon = SupConLoss()
    loss = supcon(img_f, text_f, labels, labels) + supcon(text_f, img_f, labels, labels)
    uniq = torch.unique(labels)
    p = prompts(uniq)
    views = {"aug1_embed": model.text_mlp(enc(p * masks[0], tok)),
             "aug2_embed": model.text_mlp(enc(p * masks[1], tok))}
    ssl = SimCLRLoss(temperature=temperature, gather=False)(views)
    return loss + ssl_weight * ssl, ssl


@pytest.mark.slow
def test_text_ssl_head_sees_each_view_alone(tiny_root, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_root, tmp_path)
    set_seed(cfg.SOLVER.SEED)
    data = make_dataloader(cfg)
    model = make_model(cfg, data.num_classes, data.camera_num, data.view_num)
    model.set_stage(1)
    reference = copy.deepcopy(model)

    labels = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 7, 2])
    gen = torch.Generator().manual_seed(7)
    img_f = torch.randn(labels.numel(), model.in_planes_proj, generator=gen)
    n_unique = torch.unique(labels).numel()
    d = model.prompt_learner.cls_ctx.shape[-1]
    masks = [(torch.rand(n_unique, 77, d, generator=gen) >= cfg.SOLVER.STAGE1.PROMPT_AUG_SCALE).float()
             for _ in range(2)]
    w, t = cfg.SOLVER.STAGE1.SSL_LOSS_WEIGHT, cfg.MODEL.SSL_TEMPERATURE

    # ours: the model's stage-1 forward, the stage-1 losses, one optimiser step
    monkeypatch.setattr(make_model_mod, "augment_prompts", FixedMasks(masks))
    set_stage1_modes(model)
    opt = make_optimizer_1stage(cfg, model)
    out = model(label=labels, mode="stage1")
    supcon, simclr = SupConLoss(), SimCLRLoss(temperature=t, gather=False)
    text_f = out["text_features"]
    ssl = simclr(out["ssl"])
    loss = supcon(img_f, text_f, labels, labels) + supcon(text_f, img_f, labels, labels) + w * ssl
    opt.zero_grad()
    loss.backward()
    grad = model.prompt_learner.cls_ctx.grad.clone()
    opt.step()

    # the published computation on an identical copy
    set_stage1_modes(reference)
    ref_opt = make_optimizer_1stage(cfg, reference)
    ref_loss, ref_ssl = _reference_stage1_step(reference, labels, img_f, masks, w, t)
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_grad = reference.prompt_learner.cls_ctx.grad
    ref_opt.step()

    assert ssl.item() == pytest.approx(ref_ssl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(model.prompt_learner.cls_ctx, reference.prompt_learner.cls_ctx, rtol=1e-5, atol=1e-7)
    for name in ("running_mean", "running_var"):   # the head's BatchNorm statistics moved alike
        torch.testing.assert_close(getattr(model.text_mlp.bn1, name), getattr(reference.text_mlp.bn1, name))

    # the alternative (one BatchNorm batch over both views together) gives another loss
    with torch.no_grad():
        p = model.prompt_learner(torch.unique(labels))
        tok = model.prompt_learner.tokenized_prompts
        feats = model.text_encoder(torch.cat([p * masks[0], p * masks[1]]), tok)
        e1, e2 = model.text_mlp(feats).chunk(2)
        joint = simclr({"aug1_embed": e1, "aug2_embed": e2}).item()
        e1, e2 = (model.text_mlp(f) for f in feats.chunk(2))
        per_view = simclr({"aug1_embed": e1, "aug2_embed": e2}).item()
    assert abs(joint - per_view) > 1e-3, (joint, per_view)


# ----------------------------------------------------------------------------- SSL head initialisation
def _ks_p(values, dist, *args):
    return scipy.stats.kstest(values.detach().double().flatten().numpy(), dist, args=args).pvalue


def _assert_pytorch_default_linear(lin):
    bound = 1.0 / math.sqrt(lin.in_features)     # kaiming_uniform(a=sqrt(5)) for weights; same bound for bias
    assert _ks_p(lin.weight, "uniform", -bound, 2 * bound) > 1e-3
    assert _ks_p(lin.weight, "norm", 0.0, math.sqrt(2.0 / lin.in_features)) < 1e-6
    assert lin.bias.abs().max() <= bound and lin.bias.std() > 0.3 * bound


def _ssl_model(ssl_type):
    cfg = tiny_cfg("unused", "unused", "MODEL.SSL_TYPE", ssl_type, "MODEL.SSL_HIDDEN_DIM", "512",
                   "MODEL.SSL_OUT_DIM", "128")
    set_seed(0)
    return make_model(cfg, num_class=8, camera_num=2, view_num=1)


@pytest.mark.parametrize("ssl_type", ["SIMCLR", "SIMSIAM"])
def test_image_ssl_head_initialisation(ssl_type):
    head = _ssl_model(ssl_type).image_mlp
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    bns = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == (3 if ssl_type == "SIMCLR" else 2) and bns
    for lin in linears:   # Kaiming normal, fan-in; bias left at PyTorch's default
        std = math.sqrt(2.0 / lin.in_features)
        assert _ks_p(lin.weight, "norm", 0.0, std) > 1e-3
        bound = 1.0 / math.sqrt(lin.in_features)
        assert lin.bias.abs().max() <= bound and lin.bias.std() > 0.3 * bound   # not zeroed
        assert _ks_p(lin.bias, "uniform", -bound, 2 * bound) > 1e-3
    for bn in bns:        # affine drawn from U[0, 1)
        for t in (bn.weight, bn.bias):
            assert t.min() >= 0 and t.max() < 1 and _ks_p(t, "uniform", 0.0, 1.0) > 1e-3


def test_text_ssl_head_keeps_pytorch_default_initialisation():
    head = _ssl_model("SIMCLR").text_mlp
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    for lin in linears:
        _assert_pytorch_default_linear(lin)
    for bn in (m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


# ----------------------------------------------------------------------------- bilinear test resize
def _photo_like(h, w, seed):
    """A smooth colour field with sharp edges and fine texture (what resampling filters differ on)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([np.sin(6 * x + 3 * y), np.cos(5 * y - 2 * x), x * y], -1) * 90 + 120
    img[h // 3: 2 * h // 3, w // 4: w // 2] = [200, 30, 40]                 # a sharp-edged block
    img += rng.normal(0, 12, img.shape)                                     # sensor noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _reference_test_transform(img, size_hw, mean, std, resample):
    """Resize(SIZE_TEST) with torchvision's default (bilinear) on a PIL image, ToTensor, Normalize."""
    h, w = size_hw
    a = np.asarray(img.resize((w, h), resample), np.float32) / 255.0
    return torch.from_numpy(((a - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1).copy())


def test_test_and_stage1_transforms_resize_bilinearly(tiny_root, tmp_path):
    cfg = tiny_cfg(tiny_root, tmp_path, "INPUT.SIZE_TEST", "[96, 40]")
    data = make_dataloader(cfg)
    mean, std, size = cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD, list(cfg.INPUT.SIZE_TEST)
    def loader_path(ds):      # the loader's uint8 CPU half, then its device half (on the CPU here)
        return lambda img: ds.device_transform.image(ds.transform(img)[None])[0]
    transforms = {"test": build_transforms(cfg, is_train=False),
                  "stage-1 cache": loader_path(data.train_stage1.dataset),
                  "evaluation": loader_path(data.val.dataset)}
    images = [_photo_like(256, 128, 0), _photo_like(180, 70, 1),
              Image.open(data.train_stage1.dataset.samples[0][0]).convert("RGB")]
    for img in images:
        ref = _reference_test_transform(img, size, mean, std, Image.BILINEAR)
        bicubic = _reference_test_transform(img, size, mean, std, Image.BICUBIC)
        assert (ref - bicubic).abs().max() > 0.05     # the two filters are told apart on this image
        for name, tf in transforms.items():
            torch.testing.assert_close(tf(img), ref, rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- SSL erasing area
@pytest.mark.slow
def test_ssl_views_erase_a_third_as_published(tiny_root, tmp_path):
    cfg = tiny_cfg(tiny_root, tmp_path, "INPUT.RE_PROB", "1.0")
    erase = build_ssl_transform(cfg).transforms[-1]
    h, w = 256, 128
    torch.manual_seed(0)
    fractions = []
    for _ in range(400):
        x = torch.zeros(3, h, w)
        erased = erase(x.clone()).ne(x).any(dim=0)
        fractions.append(erased.float().mean().item())
    mean = float(np.mean(fractions))
    assert min(fractions) > 0.30 and max(fractions) < 0.36
    # the published arguments (timm's min_area=0.33, max_area=1/3): each area uniform in [0.33, 1/3]
    assert mean == pytest.approx((0.33 + 1 / 3) / 2, abs=0.0015), mean
    # and with RE_PROB 0 nothing is erased
    cfg0 = tiny_cfg(tiny_root, tmp_path, "INPUT.RE_PROB", "0.0")
    x = torch.zeros(3, h, w)
    assert torch.equal(build_ssl_transform(cfg0).transforms[-1](x.clone()), x)

