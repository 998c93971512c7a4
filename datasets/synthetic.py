"""Synthetic re-identification set in the Market-1501 folder format.

An identity is a drawn figure: body proportions (height, shoulder width, head size, leg
length), skin/hair, top and bottom colours from small shared palettes (one colour never
identifies a person), a top pattern (plain, horizontal/vertical stripes, checks, a chest
logo seen only from the front), sleeves, shoes and maybe a backpack or handbag. A camera
has its own lighting (gain and colour cast), background texture and colours, figure
scale and position, blur, noise, viewpoint (share of front views) and occlusion rate;
every image adds pose, position, scale, flip and occluder jitter.

Layout written under ``out``::

    bounding_box_train/  PPPP_cCs1_FFFFFF_00.jpg   (training identities)
    query/               one image per test identity from a few of its cameras
    bounding_box_test/   the test identities' other images + distractors (pid 0) + junk (-1)
    synthetic.json       the generation parameters

Every image is drawn from its own generator seeded by ``(seed, kind, ids...)`` and JPEG
quality is fixed, so a seed gives byte-identical files regardless of generation order.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from utils.misc import write_json_atomic

from .bases import DatasetError

__all__ = ["SyntheticSpec", "SyntheticSpecError", "generate_synthetic", "ensure_synthetic", "pixel_baseline"]

logger = logging.getLogger("svllreid")

SUBDIRS = ("bounding_box_train", "query", "bounding_box_test")
META = "synthetic.json"

# Small shared palettes (RGB): many identities share each colour.
TOPS = np.array([[200, 30, 30], [30, 60, 170], [40, 140, 60], [230, 200, 40], [240, 240, 235],
                 [25, 25, 30], [150, 60, 160], [240, 130, 30], [120, 120, 125], [60, 170, 200]],
                dtype=np.float32)
BOTTOMS = np.array([[30, 40, 90], [25, 25, 30], [110, 110, 115], [190, 170, 120],
                    [70, 100, 160], [100, 65, 40], [225, 225, 220]], dtype=np.float32)
ACCENTS = np.array([[245, 245, 245], [20, 20, 20], [220, 40, 40], [40, 80, 220],
                    [250, 210, 30], [40, 170, 80], [240, 120, 180], [140, 90, 50]],
                   dtype=np.float32)
SKINS = np.array([[240, 200, 170], [210, 160, 120], [160, 110, 75], [100, 65, 45]],
                 dtype=np.float32)
HAIRS = np.array([[20, 15, 10], [90, 55, 25], [200, 170, 90], [130, 130, 130], [150, 50, 20]],
                 dtype=np.float32)
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo")
BAGS = ("none", "none", "backpack", "handbag")
TEXTURES = ("gradient", "bricks", "blotches", "floor")


MAX_IDS = 9999   # identities are drawn from the 4-digit Market ids 1..9999


class SyntheticSpecError(DatasetError):
    """A :class:`SyntheticSpec` field out of range; ``field``, ``value`` and ``expected`` say which."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"{field} = {value!r} {expected}")


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and seed of a synthetic set (defaults: the demo set)."""

    num_train_ids: int = 64
    num_test_ids: int = 32
    num_cams: int = 4
    images_per_cam: int = 4
    query_cams: int = 2          # cameras per test identity that contribute a query image
    num_distractors: int = 16    # pid 0 images in the gallery
    num_junk: int = 8            # pid -1 images in the gallery
    height: int = 128
    width: int = 64
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        at_least = {"num_train_ids": 1, "num_test_ids": 1, "images_per_cam": 1, "query_cams": 1,
                    "num_distractors": 0, "num_junk": 0, "height": 16, "width": 16, "seed": 0, "jpeg_quality": 1}
        for field, low in at_least.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SyntheticSpecError(field, value, f"must be an integer >= {low}")
        if self.num_cams < 2:
            raise SyntheticSpecError("num_cams", self.num_cams, "must be at least 2: a Market query is matched "
                                     "only by gallery images of another camera")
        if self.num_train_ids + self.num_test_ids > MAX_IDS:
            raise SyntheticSpecError("num_train_ids", self.num_train_ids,
                                     f"training + test identities must be <= {MAX_IDS} (4-digit Market ids)")
        if self.jpeg_quality > 100:
            raise SyntheticSpecError("jpeg_quality", self.jpeg_quality, "must be <= 100")


# --------------------------------------------------------------------------- attributes
@dataclass(frozen=True)
class Identity:
    height: float        # figure height / image height (before camera scale)
    shoulder: float      # shoulder width / image width
    head: float          # head height / figure height
    leg: float           # leg length / figure height
    skin: np.ndarray
    hair: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    accent: np.ndarray
    shoes: np.ndarray
    pattern: str
    period: float        # stripe/check period / image height
    long_sleeves: bool
    bag: str
    bag_colour: np.ndarray


@dataclass(frozen=True)
class Camera:
    gain: float
    cast: np.ndarray     # per-channel multiplier
    haze: float          # additive grey
    bg: np.ndarray
    bg2: np.ndarray
    texture: str
    scale: float
    offset: float        # mean horizontal offset / image width
    blur: float
    noise: float
    front_prob: float
    occlusion: float


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [int(k) for k in keys])


def _pick(rng: np.random.Generator, palette: np.ndarray, jitter: float = 12.0) -> np.ndarray:
    c = palette[rng.integers(len(palette))] + rng.normal(0.0, jitter, 3)
    return np.clip(c, 0, 255).astype(np.float32)


def make_identity(rng: np.random.Generator) -> Identity:
    top_i = int(rng.integers(len(TOPS)))
    accent = _pick(rng, ACCENTS)
    if np.abs(accent - TOPS[top_i]).sum() < 120:  # keep the pattern visible
        accent = np.clip(255.0 - TOPS[top_i], 0, 255).astype(np.float32)
    return Identity(
        height=float(rng.uniform(0.78, 0.95)), shoulder=float(rng.uniform(0.5, 0.7)),
        head=float(rng.uniform(0.12, 0.17)), leg=float(rng.uniform(0.40, 0.50)),
        skin=_pick(rng, SKINS, 8), hair=_pick(rng, HAIRS, 8),
        top=np.clip(TOPS[top_i] + rng.normal(0, 12, 3), 0, 255).astype(np.float32),
        bottom=_pick(rng, BOTTOMS), accent=accent, shoes=_pick(rng, ACCENTS[:2], 20),
        pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
        period=float(rng.uniform(0.04, 0.08)), long_sleeves=bool(rng.random() < 0.5),
        bag=BAGS[int(rng.integers(len(BAGS)))], bag_colour=_pick(rng, ACCENTS, 20),
    )


def make_camera(rng: np.random.Generator) -> Camera:
    bg = rng.uniform(40, 220, 3).astype(np.float32)
    return Camera(
        gain=float(rng.uniform(0.65, 1.25)), cast=rng.uniform(0.85, 1.15, 3).astype(np.float32),
        haze=float(rng.uniform(0, 40)), bg=bg,
        bg2=np.clip(bg + rng.normal(0, 50, 3), 0, 255).astype(np.float32),
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))], scale=float(rng.uniform(0.8, 1.0)),
        offset=float(rng.uniform(-0.1, 0.1)), blur=float(rng.uniform(0.0, 1.3)),
        noise=float(rng.uniform(2, 9)), front_prob=float(rng.uniform(0.15, 0.85)),
        occlusion=float(rng.uniform(0.05, 0.3)),
    )


# ----------------------------------------------------------------------------- drawing
class _Canvas:
    """Float RGB image with masked fills of simple shapes."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.img = np.zeros((h, w, 3), np.float32)
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5

    def trapezoid(self, y0: float, y1: float, xl0: float, xr0: float, xl1: float,
                  xr1: float) -> np.ndarray:
        """Mask of rows y0..y1 whose x-extent interpolates [xl0,xr0] -> [xl1,xr1]."""
        t = np.clip((self.yy - y0) / max(y1 - y0, 1e-3), 0, 1)
        xl, xr = xl0 + (xl1 - xl0) * t, xr0 + (xr1 - xr0) * t
        return (self.yy >= y0) & (self.yy < y1) & (self.xx >= xl) & (self.xx < xr)

    def rect(self, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
        return self.trapezoid(y0, y1, x0, x1, x0, x1)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0

    def fill(self, mask: np.ndarray, colour: np.ndarray) -> None:
        self.img[mask] = colour


def _background(cv: _Canvas, cam: Camera, rng: np.random.Generator) -> None:
    h, w = cv.h, cv.w
    bg = cam.bg * rng.uniform(0.92, 1.08)
    bg2 = cam.bg2 * rng.uniform(0.92, 1.08)
    if cam.texture == "gradient":
        t = (cv.yy / h)[..., None]
        cv.img[:] = bg * (1 - t) + bg2 * t
    elif cam.texture == "bricks":
        cv.img[:] = bg
        step = h / 10.0
        phase = rng.uniform(0, step)
        row = np.floor((cv.yy + phase) / step)
        xoff = (row % 2) * step
        mortar = (((cv.yy + phase) % step) < 1.2) | (((cv.xx + xoff) % (2 * step)) < 1.2)
        cv.img[mortar] = bg2
    elif cam.texture == "blotches":
        small = rng.uniform(0, 1, (6, 3)).astype(np.float32)
        t = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize(
            (w, h), Image.BILINEAR), np.float32)[..., None] / 255.0
        cv.img[:] = bg * (1 - t) + bg2 * t
    else:  # floor: wall above a horizon, floor below
        horizon = h * rng.uniform(0.55, 0.75)
        cv.img[:] = bg
        cv.img[cv.yy >= horizon] = bg2


def _figure(cv: _Canvas, ident: Identity, cam: Camera, rng: np.random.Generator) -> None:
    h, w = cv.h, cv.w
    s = cam.scale * rng.uniform(0.93, 1.06)
    fig_h = ident.height * h * s
    feet = h * (1 - rng.uniform(0.01, 0.07))
    top = feet - fig_h
    cx = w * (0.5 + cam.offset + rng.normal(0, 0.05))
    front = rng.random() < cam.front_prob
    sw = ident.shoulder * w * s                      # shoulder width
    head_h = ident.head * fig_h
    neck = top + head_h
    hip = feet - ident.leg * fig_h
    shoe_h = 0.035 * fig_h

    # legs (walking pose: feet apart by a random stride) and shoes
    stride = rng.uniform(-0.25, 0.25) * sw
    hw = 0.42 * sw
    gap = 0.04 * sw
    cv.fill(cv.trapezoid(hip, feet - shoe_h, cx - hw, cx - gap, cx - hw - stride, cx - gap - stride),
            ident.bottom)
    cv.fill(cv.trapezoid(hip, feet - shoe_h, cx + gap, cx + hw, cx + gap + stride, cx + hw + stride),
            ident.bottom)
    cv.fill(cv.rect(feet - shoe_h, feet, cx - hw - stride - 1, cx - gap - stride), ident.shoes)
    cv.fill(cv.rect(feet - shoe_h, feet, cx + gap + stride, cx + hw + stride + 1), ident.shoes)
    # arms (swing) and sleeves
    arm_w = 0.2 * sw
    arm_end = hip + 0.08 * fig_h
    swing = rng.uniform(-0.15, 0.15) * sw
    sleeve_end = arm_end if ident.long_sleeves else neck + 0.45 * (hip - neck)
    for side in (-1, 1):
        x0 = cx + side * sw / 2
        xa, xb = sorted((x0, x0 + side * arm_w))
        arm = cv.trapezoid(neck + 0.05 * fig_h, arm_end, xa, xb, xa + side * swing, xb + side * swing)
        cv.fill(arm, ident.skin)
        cv.fill(arm & (cv.yy < sleeve_end), ident.top)
    # torso with pattern
    torso = cv.trapezoid(neck + 0.02 * fig_h, hip + 0.02 * fig_h, cx - sw / 2, cx + sw / 2,
                         cx - 0.85 * sw / 2, cx + 0.85 * sw / 2)
    cv.fill(torso, ident.top)
    p = ident.period * h * s
    if ident.pattern == "hstripes":
        cv.fill(torso & (((cv.yy - neck) // p) % 2 == 1), ident.accent)
    elif ident.pattern == "vstripes":
        cv.fill(torso & (((cv.xx - cx) // (0.7 * p)) % 2 == 1), ident.accent)
    elif ident.pattern == "checks":
        cv.fill(torso & ((((cv.yy - neck) // p) + ((cv.xx - cx) // p)) % 2 == 1), ident.accent)
    elif ident.pattern == "logo" and front:
        cv.fill(cv.ellipse(neck + 0.3 * (hip - neck), cx, 0.12 * (hip - neck), 0.22 * sw),
                ident.accent)
    # bags: a backpack shows its straps from the front and its body from the back
    if ident.bag == "backpack":
        if front:
            for side in (-1, 1):
                x = cx + side * 0.28 * sw
                cv.fill(cv.rect(neck, neck + 0.55 * (hip - neck), x - 0.06 * sw, x + 0.06 * sw),
                        ident.bag_colour)
        else:
            cv.fill(cv.rect(neck + 0.06 * fig_h, neck + 0.7 * (hip - neck), cx - 0.4 * sw,
                            cx + 0.4 * sw), ident.bag_colour)
    elif ident.bag == "handbag":
        x = cx + (0.5 * sw + arm_w) * (1 if front else -1)
        cv.fill(cv.rect(hip - 0.02 * fig_h, hip + 0.15 * fig_h, x - 0.2 * sw, x + 0.2 * sw),
                ident.bag_colour)
    # head and hair
    cy, ry, rx = top + head_h / 2, head_h / 2, 0.4 * head_h
    head = cv.ellipse(cy, cx, ry, rx)
    cv.fill(head, ident.skin)
    cv.fill(head & (cv.yy < cy - 0.25 * ry) if front else head, ident.hair)


def _occlude(cv: _Canvas, cam: Camera, rng: np.random.Generator) -> None:
    if rng.random() >= cam.occlusion:
        return
    colour = np.clip(rng.uniform(20, 235, 3) * 0.5 + cam.bg2 * 0.5, 0, 255)
    h, w = cv.h, cv.w
    if rng.random() < 0.5:  # low obstacle (car, bench, railing)
        cv.fill(cv.rect(h * (1 - rng.uniform(0.2, 0.45)), h, 0, w), colour)
    else:  # pole or passer-by at one side
        width = w * rng.uniform(0.2, 0.4)
        x0 = 0 if rng.random() < 0.5 else w - width
        cv.fill(cv.rect(0, h, x0, x0 + width), colour)


def render(ident: Identity | None, cam: Camera, rng: np.random.Generator, h: int, w: int,
           junk: bool = False) -> np.ndarray:
    """One uint8 image (h, w, 3); ``ident=None`` draws background only."""
    cv = _Canvas(h, w)
    _background(cv, cam, rng)
    if ident is not None:
        _figure(cv, ident, cam, rng)
        _occlude(cv, cam, rng)
    img = cv.img
    if junk and ident is not None:  # a badly cropped detection: only a slice of the person
        keep = int(h * rng.uniform(0.25, 0.45))
        img = np.repeat(img[:keep] if rng.random() < 0.5 else img[-keep:], h // keep + 1,
                        axis=0)[:h]
    if rng.random() < 0.5:  # walking direction
        img = img[:, ::-1]
    img = img * cam.gain * cam.cast + cam.haze
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if cam.blur > 0.05:
        pil = pil.filter(ImageFilter.GaussianBlur(cam.blur * h / 128))
    out = np.asarray(pil, np.float32) + rng.normal(0, cam.noise, (h, w, 3))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- writing
def _plan(spec: SyntheticSpec) -> dict[str, list[tuple[int, int, int]]]:
    """``subset -> [(pid, camera 1..C, image index)]``; pids are random in 1..9999."""
    rng = _rng(spec.seed, 0)
    n_ids = spec.num_train_ids + spec.num_test_ids
    pids = rng.choice(np.arange(1, 10000), n_ids, replace=False)
    rng.shuffle(pids)
    plan: dict[str, list[tuple[int, int, int]]] = {s: [] for s in SUBDIRS}
    for n, pid in enumerate(pids.tolist()):
        c = spec.num_cams
        n_cams = c if (c == 2 or rng.random() < 0.5) else int(rng.integers(2, c))
        cams = sorted((rng.choice(c, n_cams, replace=False) + 1).tolist())
        shots = [(pid, cam, k) for cam in cams for k in range(spec.images_per_cam)]
        if n < spec.num_train_ids:
            plan["bounding_box_train"] += shots
            continue
        q_cams = set(rng.choice(cams, min(spec.query_cams, len(cams) - 1), replace=False).tolist())
        plan["query"] += [s for s in shots if s[1] in q_cams and s[2] == 0]
        plan["bounding_box_test"] += [s for s in shots if not (s[1] in q_cams and s[2] == 0)]
    for kind, count in ((0, spec.num_distractors), (-1, spec.num_junk)):
        cams = rng.integers(1, spec.num_cams + 1, count)
        plan["bounding_box_test"] += [(kind, int(c), k) for k, c in enumerate(cams)]
    return plan


def _clear(out: str) -> None:
    for sub in SUBDIRS:
        d = os.path.join(out, sub)
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.endswith(".jpg"):
                    os.remove(os.path.join(d, f))
    if os.path.exists(os.path.join(out, META)):
        os.remove(os.path.join(out, META))


def generate_synthetic(out: str, spec: SyntheticSpec | None = None, overwrite: bool = False,
                       **kwargs: Any) -> dict[str, int]:
    """Write the set described by ``spec`` (or ``SyntheticSpec(**kwargs)``) under ``out``.

    An existing non-empty set is replaced only with ``overwrite``, and only a set this function
    wrote (its ``synthetic.json``, written before the first image, so that an interrupted set
    counts too): its ``.jpg`` files and ``synthetic.json`` are removed first. Images that it did
    not write (a real dataset) are never removed. Returns the number of images per subset.
    """
    spec = spec or SyntheticSpec(**kwargs)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DatasetError(f"{out} is a file, not a folder: give a new or an existing folder to write the set into")
    existing = [s for s in SUBDIRS if os.path.isdir(os.path.join(out, s))
                and os.listdir(os.path.join(out, s))]
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out} already holds images ({', '.join(existing)}); "
                                  "pass overwrite=True (--overwrite) to replace them")
        if not os.path.isfile(os.path.join(out, META)):
            raise DatasetError(f"{out} holds images ({', '.join(existing)}) that were not written by the synthetic "
                               f"set generator (no {META}): --overwrite replaces only a synthetic set, never other "
                               "images; give another output folder")
        _clear(out)
    os.makedirs(out, exist_ok=True)
    # the generation parameters; written first (marked incomplete until the last image), so the folder is ours
    write_json_atomic(os.path.join(out, META), {**dataclasses.asdict(spec), "incomplete": True})
    h, w = spec.height, spec.width
    cams = {c: make_camera(_rng(spec.seed, 2, c)) for c in range(1, spec.num_cams + 1)}
    frames = {c: 0 for c in cams}
    counts = {}
    for sub, shots in _plan(spec).items():
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        for pid, cam, k in shots:
            rng = _rng(spec.seed, 3, pid + 1, cam, k)
            if pid > 0:
                ident = make_identity(_rng(spec.seed, 1, pid))
            elif pid == 0:  # distractor: a person outside the identity set
                ident = make_identity(_rng(spec.seed, 4, k))
            else:  # junk: background only or a sliver of a person
                ident = make_identity(_rng(spec.seed, 5, k)) if k % 2 else None
            img = render(ident, cams[cam], rng, h, w, junk=pid < 0)
            frames[cam] += int(rng.integers(1, 50))
            name = f"{pid:04d}" if pid >= 0 else "-1"
            path = os.path.join(out, sub, f"{name}_c{cam}s1_{frames[cam]:06d}_00.jpg")
            Image.fromarray(img).save(path, format="JPEG", quality=spec.jpeg_quality,
                                      optimize=False, progressive=False, subsampling=0)
        counts[sub] = len(shots)
    write_json_atomic(os.path.join(out, META), dataclasses.asdict(spec))
    logger.info("synthetic set written to %s: %s", out, counts)
    return counts


def ensure_synthetic(out: str, spec: SyntheticSpec | None = None, **kwargs: Any) -> str:
    """Generate under ``out`` unless a set with the same parameters is already there."""
    spec = spec or SyntheticSpec(**kwargs)
    meta = os.path.join(out, META)
    if os.path.isfile(meta):
        with open(meta) as f:
            if json.load(f) == dataclasses.asdict(spec):
                return out
    generate_synthetic(out, spec, overwrite=os.path.isfile(meta))
    return out


# ------------------------------------------------------------------- sanity baseline
def pixel_baseline(root: str, size: tuple[int, int] = (16, 8)) -> dict[str, float]:
    """mAP/rank-1 of raw downsampled pixels (``size`` = h, w) and of an identity oracle.

    Squared Euclidean distance, Market protocol (``utils.metrics.eval_func``).
    """
    import torch

    from utils.metrics import euclidean_distance, eval_func

    from .folder import FolderDataset

    ds = FolderDataset(root)

    def feats(samples: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.stack([np.asarray(Image.open(p).convert("RGB").resize(
            (size[1], size[0]), Image.BILINEAR), np.float32).ravel() / 255.0
            for p, _, _, _ in samples])
        return x, np.array([s[1] for s in samples]), np.array([s[2] for s in samples])

    def score(qf: np.ndarray, gf: np.ndarray) -> tuple[float, float]:
        cmc, m_ap, _ = eval_func(euclidean_distance(torch.from_numpy(qf), torch.from_numpy(gf)),
                                 qp, gp, qc, gc, max_rank=1)
        return float(m_ap), float(cmc[0])

    qf, qp, qc = feats(ds.query)
    gf, gp, gc = feats(ds.gallery)
    pix_map, pix_r1 = score(qf, gf)
    ids = {p: i for i, p in enumerate(sorted(set(qp.tolist()) | set(gp.tolist())))}
    onehot = np.eye(len(ids), dtype=np.float32)
    orc_map, orc_r1 = score(onehot[[ids[p] for p in qp]], onehot[[ids[p] for p in gp]])
    return {"pixel_mAP": pix_map, "pixel_rank1": pix_r1,
            "oracle_mAP": orc_map, "oracle_rank1": orc_r1}
