"""The split image pipeline (uint8 geometry in the loaders, float / normalise / erase on the device)
against today's per-image CPU pipeline and timm's RandomErasing.

* test transform: equal to torchvision ``Resize + ToTensor + Normalize`` (max abs diff <= 1e-6;
  on the CPU it is bit-identical) on real files of several sizes and modes;
* train geometry: equal to ``Resize(bicubic) + RandomHorizontalFlip + Pad + RandomCrop`` under
  the same torch RNG draws, three views from one resize included;
* erasing: over 20,000 draws the erase rate, the area fraction, the log aspect ratio and the
  box position match timm's ``RandomErasing(mode='pixel', max_count=1)`` on the same image
  sizes (two-sample KS tests, alpha = 0.001 at fixed seeds; each test also shows that a wrong
  rule is rejected), and the erased pixels are N(0, 1);
* the per-epoch erasing seed (exact resume), the one place batches reach the device, and the
  model refusing uint8 images.
"""
from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import scipy.stats
import timm.data.random_erasing as timm_re
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Subset

from datasets.bases import ImageDataset
from datasets.device_transforms import (
    ERASE_AREA,
    DeviceTransform,
    erase_boxes,
    erase_seed,
    normalize_uint8,
    random_erase,
)
from datasets.transforms import SSL_ERASE_AREA, TestTransform, TrainTransform
from processor.batches import device_transform_of, to_device
from utils.images import read_image

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]   # CLIP's, not 0.5s
N_DRAWS = 20_000
ALPHA = 1e-3      # KS p-value below which two samples are called different (fixed seeds: deterministic)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour field with a sharp block and noise (what resampling filters differ on), HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([np.sin(6 * x + 3 * y), np.cos(5 * y - 2 * x), x * y], -1) * 90 + 120
    img[h // 3: 2 * h // 3, w // 4: w // 2] = [200, 30, 40]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    """Files as a dataset may hold them: JPEG and PNG RGB, grey, RGBA, palette and 16-bit grey, of
    sizes below, at and above the transform size."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (h, w, mode, ext) in enumerate([(128, 64, "RGB", "jpg"), (64, 32, "RGB", "png"), (301, 97, "RGB", "jpg"),
                                           (40, 70, "L", "png"), (90, 45, "RGBA", "png"), (77, 31, "P", "png"),
                                           (50, 24, "I;16", "png")]):
        a = _photo(h, w, i)
        if mode == "I;16":
            img = Image.fromarray(a[..., 0].astype(np.uint16) * 257)
        else:
            img = Image.fromarray(a).convert(mode)
        p = str(d / f"{i}_{mode.replace(';', '')}.{ext}")
        img.save(p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- test transform
def test_test_transform_equals_resize_totensor_normalize(image_files):
    size = [64, 32]
    reference = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(MEAN, STD)])   # today's CPU path
    cpu, device = TestTransform(size), DeviceTransform(MEAN, STD)
    for path in image_files:
        img = read_image(path)
        u8 = cpu(img)
        assert u8.dtype == torch.uint8 and u8.shape == (3, *size) and u8.is_contiguous()
        got = device.image(u8[None])[0]
        ref = reference(img)
        assert (got - ref).abs().max().item() <= 1e-6, path
        assert torch.equal(got, ref), path            # on the CPU the same operations give the same bits
    # a batch normalises as its images do, and only uint8 is accepted
    batch = torch.stack([cpu(read_image(p)) for p in image_files])
    assert torch.equal(normalize_uint8(batch, MEAN, STD)[2], reference(read_image(image_files[2])))
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(batch.float(), MEAN, STD)


def test_loader_transforms_take_images_of_any_mode():
    """A PIL image that is not RGB (as a user's own reader may give) is made RGB first."""
    grey = Image.fromarray(_photo(20, 10, 0)[..., 0])
    want = T.Compose([T.Resize([16, 8]), T.PILToTensor()])(grey.convert("RGB"))
    assert torch.equal(TestTransform([16, 8])(grey), want)
    torch.manual_seed(0)
    assert torch.equal(TrainTransform([16, 8], 0.0, 0)(grey),
                       T.Compose([T.Resize([16, 8], interpolation=T.InterpolationMode.BICUBIC),
                                  T.PILToTensor()])(grey.convert("RGB")))


# ----------------------------------------------------------------------------- train geometry
def _reference_geometry(size, prob, padding):
    """Today's train pipeline up to the float conversion (as uint8: the float steps are per pixel)."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(prob),
                      T.Pad(padding), T.RandomCrop(size), T.PILToTensor()])


@pytest.mark.parametrize("padding", [0, 3, 10])
def test_train_geometry_equals_torchvision_under_the_same_draws(image_files, padding):
    size = [48, 24]
    ours, ref = TrainTransform(size, 0.5, padding), _reference_geometry(size, 0.5, padding)
    for seed, path in enumerate(image_files * 3):
        img = read_image(path)
        torch.manual_seed(seed)
        got = ours(img)
        after_ours = torch.get_rng_state()
        torch.manual_seed(seed)
        want = ref(img)
        assert got.dtype == torch.uint8 and torch.equal(got, want), (path, seed)
        assert torch.equal(after_ours, torch.get_rng_state())     # the same draws, no more, no fewer


def test_three_views_from_one_resize_equal_three_full_pipelines(image_files):
    """A stage-2 item (image + two SSL views) under a seed = three calls of today's pipeline under it."""
    size, padding = [48, 24], 4
    ds = ImageDataset([(p, 0, 0, 0) for p in image_files], TrainTransform(size, 0.5, padding), ssl_views=True)
    ref = _reference_geometry(size, 0.5, padding)
    for i, path in enumerate(image_files):
        torch.manual_seed(100 + i)
        item = ds[i]
        torch.manual_seed(100 + i)
        img = read_image(path)
        want = [ref(img) for _ in range(3)]
        for key, w in zip(("img", "ssl_view1", "ssl_view2"), want):
            assert torch.equal(item[key], w), (path, key)
    assert not torch.equal(item["img"], item["ssl_view1"]) or not torch.equal(item["img"], item["ssl_view2"])


def test_stage2_items_equal_the_published_pipeline_with_erasing_off(tiny_root, tmp_path):
    """With INPUT.RE_PROB 0, a stage-2 loader item finished on the device == the published per-image
    pipeline (build_transforms / build_ssl_transform: Compose with ToTensor and Normalize) under the same seed."""
    from datasets import make_dataloader
    from datasets.transforms import build_ssl_transform, build_transforms
    from tests.helpers import tiny_cfg
    cfg = tiny_cfg(tiny_root, tmp_path, "INPUT.RE_PROB", "0.0", "MODEL.USE_SSL", "True", "INPUT.PADDING", "5")
    data = make_dataloader(cfg)
    ds, prepare = data.train_stage2.dataset, device_transform_of(data.train_stage2)
    train_tf, ssl_tf = build_transforms(cfg, is_train=True), build_ssl_transform(cfg)
    for i in range(0, len(ds), 7):
        torch.manual_seed(i)
        got = to_device({k: v[None] if torch.is_tensor(v) else v for k, v in ds[i].items()},
                        torch.device("cpu"), prepare)
        torch.manual_seed(i)
        img = read_image(ds.samples[i][0])
        want = [train_tf(img), ssl_tf(img), ssl_tf(img)]
        for key, w in zip(("img", "ssl_view1", "ssl_view2"), want):
            assert torch.equal(got[key][0], w), (i, key)


def test_flip_probability():
    chw = np.arange(3 * 8 * 4, dtype=np.uint8).reshape(3, 8, 4)     # no padding: a view is the image or its mirror
    torch.manual_seed(0)
    for prob in (0.0, 0.5, 1.0):
        t = TrainTransform([8, 4], prob, 0)
        flipped = np.mean([not np.array_equal(t.view(chw).numpy(), chw) for _ in range(4000)])
        assert abs(flipped - prob) <= 4 * math.sqrt(0.25 / 4000), (prob, flipped)   # 4 sigma of a binomial


# ----------------------------------------------------------------------------- random erasing vs timm
class _Recorder:
    """Stands in for an image in timm's ``_erase``: records the slice it writes (the erased box)."""

    box: tuple[int, int, int, int] | None = None

    def __setitem__(self, index, value) -> None:
        _, rows, cols = index
        self.box = (rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)


def _timm_boxes(h: int, w: int, prob: float, area: tuple[float, float], n: int, seed: int,
                monkeypatch) -> np.ndarray:
    """(n, 5) [erased, top, left, height, width] of timm's RandomErasing, as the loaders used it."""
    monkeypatch.setattr(timm_re, "_get_pixels", lambda *a, **k: None)
    erase = timm_re.RandomErasing(probability=prob, min_area=area[0], max_area=area[1], mode="pixel", max_count=1,
                                  device="cpu")
    random.seed(seed)
    out = np.zeros((n, 5), np.int64)
    for i in range(n):
        rec = _Recorder()
        erase._erase(rec, 3, h, w, torch.float32)
        if rec.box is not None:
            out[i] = (1, *rec.box)
    return out


def _our_boxes(h: int, w: int, prob: float, area: tuple[float, float], n: int, seed: int) -> np.ndarray:
    top, left, bh, bw = erase_boxes(n, h, w, prob, area, torch.Generator().manual_seed(seed))
    return torch.stack([(bh > 0) & (bw > 0), top, left, bh, bw], 1).numpy().astype(np.int64)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    return scipy.stats.ks_2samp(a, b).pvalue


@pytest.mark.parametrize("h,w", [(32, 16), (256, 128)])
def test_erasing_matches_timm(h, w, monkeypatch):
    """Erase rate, area fraction, log aspect ratio and position against timm on the same size."""
    prob = 0.5
    ours = _our_boxes(h, w, prob, ERASE_AREA, N_DRAWS, 1)
    timm = _timm_boxes(h, w, prob, ERASE_AREA, N_DRAWS, 2, monkeypatch)
    # rate: both binomial(n, p') with p' = p x P(a valid attempt); 4.5 sigma of the difference of two proportions
    r_ours, r_timm = ours[:, 0].mean(), timm[:, 0].mean()
    assert abs(r_ours - r_timm) <= 4.5 * math.sqrt(2 * 0.25 / N_DRAWS), (r_ours, r_timm)
    assert abs(r_ours - prob) <= 4.5 * math.sqrt(0.25 / N_DRAWS)
    o, t = ours[ours[:, 0] == 1], timm[timm[:, 0] == 1]

    def area(b):
        return b[:, 3] * b[:, 4] / (h * w)

    def log_ratio(b):
        return np.log(b[:, 3] / b[:, 4])

    def centre(b):
        return (b[:, 1] + b[:, 3] / 2) / h
    for name, f in (("area", area), ("log aspect", log_ratio), ("vertical centre", centre),
                    ("left", lambda b: b[:, 2] / w)):
        assert _ks(f(o), f(t)) > ALPHA, name
    assert o[:, 3].max() < h and o[:, 4].max() < w and (o[:, 1] + o[:, 3]).max() <= h and (o[:, 2] + o[:, 4]).max() <= w
    # the published rules, up to the rounding of the sides: an attempt draws the area uniform in [0.02, 1/3] and
    # the log aspect ratio uniform in [log 0.3, log 1/0.3] and is kept when the box fits. On 256x128 every area
    # fits at aspect ratios >= 0.8 and every ratio fits at areas <= 0.14, so there the kept values are uniform.
    if h * w >= 256 * 128:
        for b in (o, t):
            a, lr = area(b), log_ratio(b)
            assert a.min() > 0.02 - 0.005 and a.max() < 1 / 3 + 0.005
            assert lr.min() > math.log(0.3) - 0.05 and lr.max() < -math.log(0.3) + 0.05
            assert scipy.stats.kstest(a[lr > math.log(0.8)], scipy.stats.uniform(0.02, 1 / 3 - 0.02).cdf
                                      ).pvalue > ALPHA
            lo, hi = math.log(0.3), -math.log(0.3)
            assert scipy.stats.kstest(lr[a < 0.14], scipy.stats.uniform(lo, hi - lo).cdf).pvalue > ALPHA
    # power: the same tests reject a wrong rule (aspect ratio uniform instead of log-uniform; SSL's fixed area)
    r = np.random.default_rng(0).uniform(0.3, 1 / 0.3, len(o))
    target = area(o) * h * w
    wrong_log_ratio = np.log(np.round(np.sqrt(target * r)) / np.round(np.sqrt(target / r)))
    assert _ks(wrong_log_ratio, log_ratio(t)) < ALPHA
    fixed = _our_boxes(h, w, prob, SSL_ERASE_AREA, N_DRAWS, 3)
    assert _ks(area(fixed[fixed[:, 0] == 1]), area(t)) < ALPHA


def test_ssl_views_erase_the_published_area_range_like_timm(monkeypatch):
    """The SSL views' erasing, as the training config builds it, against timm's RandomErasing with the
    published arguments (min_area=0.33, max_area=1/3: each area uniform in [0.33, 0.3333...]); the same
    test tells a fixed area of 0.33 apart."""
    from config import load_config
    h, w = 256, 128
    area = DeviceTransform.from_cfg(load_config(None, []), is_train=True).erase_areas["ssl_view1"]
    ours = _our_boxes(h, w, 0.5, area, N_DRAWS, 4)
    timm = _timm_boxes(h, w, 0.5, (0.33, 1 / 3), N_DRAWS, 5, monkeypatch)
    o, t = ours[ours[:, 0] == 1], timm[timm[:, 0] == 1]
    fo, ft = o[:, 3] * o[:, 4] / (h * w), t[:, 3] * t[:, 4] / (h * w)
    assert _ks(fo, ft) > ALPHA and _ks(np.log(o[:, 3] / o[:, 4]), np.log(t[:, 3] / t[:, 4])) > ALPHA
    assert _ks((o[:, 1] + o[:, 3] / 2) / h, (t[:, 1] + t[:, 3] / 2) / h) > ALPHA
    assert fo.mean() == pytest.approx((0.33 + 1 / 3) / 2, abs=0.001)
    assert 0.32 < fo.min() and fo.max() < 0.345
    fixed = _our_boxes(h, w, 0.5, (0.33, 0.33), N_DRAWS, 6)          # the area fixed at 0.33: rejected
    assert _ks(fixed[fixed[:, 0] == 1][:, 3] * fixed[fixed[:, 0] == 1][:, 4] / (h * w), ft) < ALPHA


@pytest.mark.parametrize("dense", [True, False])
def test_erased_pixels_are_the_boxes_and_standard_normal(dense):
    """random_erase fills exactly erase_boxes' boxes (same generator state), every channel, with N(0, 1)."""
    n, h, w = 400, 32, 16
    x = torch.full((n, 3, h, w), 7.0)
    random_erase(x, 0.5, ERASE_AREA, torch.Generator().manual_seed(9), dense=dense)
    top, left, bh, bw = erase_boxes(n, h, w, 0.5, ERASE_AREA, torch.Generator().manual_seed(9))
    erased = x.ne(7.0)
    assert torch.equal(erased[:, 0], erased[:, 1]) and torch.equal(erased[:, 0], erased[:, 2])
    for i in range(n):
        box = torch.zeros(h, w, dtype=torch.bool)
        box[top[i]:top[i] + bh[i], left[i]:left[i] + bw[i]] = True
        assert torch.equal(erased[i, 0], box), i
    values = x[erased].numpy()
    assert values.size > 10_000
    assert scipy.stats.kstest(values, "norm").pvalue > ALPHA
    assert abs(values.mean()) < 5 / math.sqrt(values.size) and abs(values.std() - 1) < 0.02
    assert scipy.stats.kstest(values * 1.1, "norm").pvalue < ALPHA      # the test tells a std of 1.1 apart
    assert torch.equal(random_erase(x.clone(), 0.0, ERASE_AREA, torch.Generator()), x)   # RE_PROB 0: nothing


# ----------------------------------------------------------------------------- the device transform
def test_device_transform_erases_the_train_keys_per_epoch_seed():
    t = DeviceTransform(MEAN, STD, 1.0, {"img": ERASE_AREA, "ssl_view1": (0.33, 0.33)}, seed=5)
    batch = {"img": torch.zeros(4, 3, 32, 16, dtype=torch.uint8), "ssl_view1": torch.zeros(4, 3, 32, 16,
                                                                                          dtype=torch.uint8),
             "ssl_view2": torch.zeros(4, 3, 32, 16, dtype=torch.uint8), "pid": torch.arange(4)}
    plain = normalize_uint8(batch["img"], MEAN, STD)

    def run(epoch, rank=0, warmup=0):
        t.set_epoch(5, epoch, rank)
        for _ in range(warmup):            # what ran before in the epoch's past does not matter
            t(batch)
        t.set_epoch(5, epoch, rank)
        return t(batch)
    a = run(3)
    assert a["img"].dtype == torch.float32 and torch.equal(a["pid"], batch["pid"])
    assert a["img"].ne(plain).any() and a["ssl_view1"].ne(plain).any()
    assert torch.equal(a["ssl_view2"], plain)          # a key without an area is only normalised
    b = run(3, warmup=2)
    assert all(torch.equal(a[k], b[k]) for k in ("img", "ssl_view1"))
    assert not torch.equal(a["img"], run(4)["img"]) and not torch.equal(a["img"], run(3, rank=1)["img"])
    assert len({erase_seed(5, e, r) for e in range(3) for r in range(3)}) == 9
    # pickled into loader workers without its generator; the copy erases as the original does
    t.set_epoch(5, 3, 0)
    t(batch)
    copy = pickle.loads(pickle.dumps(t))
    assert copy._gen is None
    t.set_epoch(5, 3, 0)
    copy.set_epoch(5, 3, 0)
    assert torch.equal(t(batch)["img"], copy(batch)["img"])


def test_from_cfg_and_the_loaders_carry_it(tiny_root, tmp_path):
    from datasets import make_dataloader
    from tests.helpers import tiny_cfg
    cfg = tiny_cfg(tiny_root, tmp_path, "INPUT.RE_PROB", "0.7", "MODEL.USE_SSL", "True")
    data = make_dataloader(cfg)
    train, test = device_transform_of(data.train_stage2), device_transform_of(data.val)
    assert train.erase_prob == 0.7 and train.erase_areas == {"img": ERASE_AREA, "ssl_view1": (0.33, 1 / 3),
                                                             "ssl_view2": (0.33, 1 / 3)}
    assert test.erase_prob == 0.0 and device_transform_of(data.train_stage1).erase_prob == 0.0
    assert train.mean == list(cfg.INPUT.PIXEL_MEAN) and train.std == list(cfg.INPUT.PIXEL_STD)
    assert device_transform_of(Subset(data.val.dataset, [0, 1])) is test
    # the loader's item, finished by to_device, is today's test transform of the file
    item = data.val.dataset[0]
    ref = T.Compose([T.Resize(list(cfg.INPUT.SIZE_TEST)), T.ToTensor(),
                     T.Normalize(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)])(read_image(item["path"]))
    got = to_device({"img": item["img"][None]}, torch.device("cpu"), test)["img"][0]
    assert torch.equal(got, ref)


def test_the_model_refuses_uint8_images(tiny_root, tmp_path):
    from model import make_model
    from tests.helpers import tiny_cfg
    cfg = tiny_cfg(tiny_root, tmp_path)
    model = make_model(cfg, num_class=8, camera_num=2, view_num=1).eval()
    x = torch.zeros(2, 3, 64, 32, dtype=torch.uint8)
    for call in (lambda: model(x, mode="image_proj"), lambda: model.retrieval_features(x, torch.zeros(2).long())):
        with pytest.raises(TypeError, match="uint8 images.*to_device"):
            call()
    with torch.no_grad():
        assert model(DeviceTransform(MEAN, STD).image(x), mode="image_proj").dtype == torch.float32
