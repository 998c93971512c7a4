"""yacs configuration: ``from config import cfg`` (defaults) or ``load_config(file, opts)``.

Differences from plain yacs, all aimed at clear behaviour:
- YAML ``yes``/``no``/``on``/``off`` stay the strings written (YAML 1.1 would turn them
  into booleans and yacs would then reject them); boolean keys accept those words too.
- ``freeze()`` validates every choice key and fails with one line naming the key, the
  value and the allowed values.
"""
from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from yacs.config import CfgNode as _YacsNode

from utils.errors import ConfigError
from utils.yesno import BOOL_WORDS, is_yes

from .defaults import _C as _DEFAULTS

__all__ = ["cfg", "CfgNode", "ConfigError", "load_config", "get_default_config", "get_key", "is_yes",
           "settings_summary", "CHOICES", "INERT_KEYS", "OPTIMIZERS", "WARMUP_METHODS", "DATASET_NAMES"]

# Names the config offers and the lower rooms implement (solver, datasets check that they match).
OPTIMIZERS = ("Adam", "AdamW", "SGD")
WARMUP_METHODS = ("constant", "linear")
DATASET_NAMES = ("market1501", "dukemtmc", "msmt17", "occ_duke", "veri", "VehicleID", "folder")


# key -> allowed values (compared as written; see _check_choice for case handling)
CHOICES: dict[str, Sequence[Any]] = {
    "MODEL.NAME": ("ViT-B-16", "RN50"),
    "MODEL.CLIP_INIT": ("pretrained", "random"),
    "MODEL.METRIC_LOSS_TYPE": ("triplet", "triplet_center"),
    "MODEL.IF_LABELSMOOTH": ("on", "off"),
    "MODEL.SSL_TYPE": ("SIMCLR", "SIMSIAM"),
    "DATASETS.VEHICLEID_TEST_SIZE": (800, 1600, 2400),
    "DATALOADER.SAMPLER": ("softmax", "triplet", "softmax_triplet"),
    "SOLVER.STAGE1.OPTIMIZER_NAME": OPTIMIZERS,
    "SOLVER.STAGE1.PROMPT_AUG_METHOD": ("mask", "swap", "mix"),
    "SOLVER.STAGE2.OPTIMIZER_NAME": OPTIMIZERS,
    "SOLVER.STAGE2.WARMUP_METHOD": WARMUP_METHODS,
    "TEST.NECK_FEAT": ("before", "after"),
    "TEST.FEAT_NORM": ("yes", "no"),
    "TEST.DIST_METRIC": ("euclidean", "cosine"),
    "TEST.USE_SIE": ("auto", "yes", "no"),
}

_NO_SCHEDULE = "stage 1 uses the cosine schedule (BASE_LR, WARMUP_LR_INIT, WARMUP_EPOCHS, LR_MIN)"
_NO_WARMUP_EPOCHS = "stage 2 uses the warm-up multi-step schedule (WARMUP_FACTOR, WARMUP_ITERS, STEPS, GAMMA)"
_NO_MARGIN_HEAD = "no cosine-margin classifier exists; the ID heads are plain linear layers"
# Keys of the published configs that the published SVLL-ReID code does not act on either.
# They load (so the published YAMLs do), but a value other than the default is refused:
# it would be silently ignored.
INERT_KEYS: dict[str, str] = {
    "MODEL.NECK": "the BNNeck is always built; TEST.NECK_FEAT picks the feature before or after it",
    "MODEL.IF_WITH_CENTER": "the center loss is switched on by MODEL.METRIC_LOSS_TYPE triplet_center",
    "MODEL.ID_LOSS_TYPE": "the ID loss is softmax cross-entropy (label smoothing: MODEL.IF_LABELSMOOTH)",
    "MODEL.LAST_STRIDE": "the RN50 layer4 stride is fixed at 1, as in the published model",
    "MODEL.PRETRAIN_CHOICE": "CLIP weights are chosen by MODEL.CLIP_INIT and MODEL.PRETRAIN_PATH",
    "MODEL.COS_LAYER": _NO_MARGIN_HEAD,
    "MODEL.DROP_PATH": "the CLIP towers have no drop-path",
    "MODEL.DROP_OUT": "the CLIP towers have no dropout",
    "MODEL.ATT_DROP_RATE": "the CLIP towers have no attention dropout",
    "MODEL.TRANSFORMER_TYPE": "the backbone is chosen by MODEL.NAME",
    "SOLVER.STAGE1.BIAS_LR_FACTOR": "stage 1 trains only the prompt vectors (no biases)",
    "SOLVER.STAGE1.WEIGHT_DECAY_BIAS": "stage 1 trains only the prompt vectors (no biases)",
    "SOLVER.STAGE1.EVAL_PERIOD": "stage 1 does not evaluate; stage 2 does (SOLVER.STAGE2.EVAL_PERIOD)",
    "SOLVER.STAGE1.GAMMA": _NO_SCHEDULE,
    "SOLVER.STAGE1.STEPS": _NO_SCHEDULE,
    "SOLVER.STAGE1.WARMUP_FACTOR": _NO_SCHEDULE,
    "SOLVER.STAGE1.WARMUP_ITERS": _NO_SCHEDULE,
    "SOLVER.STAGE1.WARMUP_METHOD": _NO_SCHEDULE,
    "SOLVER.STAGE1.COSINE_MARGIN": _NO_MARGIN_HEAD,
    "SOLVER.STAGE1.COSINE_SCALE": _NO_MARGIN_HEAD,
    "SOLVER.STAGE2.LR_MIN": _NO_WARMUP_EPOCHS,
    "SOLVER.STAGE2.WARMUP_EPOCHS": _NO_WARMUP_EPOCHS,
    "SOLVER.STAGE2.WARMUP_LR_INIT": _NO_WARMUP_EPOCHS,
    "SOLVER.STAGE2.COSINE_MARGIN": _NO_MARGIN_HEAD,
    "SOLVER.STAGE2.COSINE_SCALE": _NO_MARGIN_HEAD,
    "TEST.DIST_MAT": "the distance matrix is not saved; results go to results.json",
    "TEST.EVAL": "evaluation always runs (stage 2 every SOLVER.STAGE2.EVAL_PERIOD epochs, and test_svllreid.py)",
}

_WORD_PAIRS = ({"yes", "no"}, {"on", "off"})


class _KeepWordsLoader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false: 'yes'/'no'/'on'/'off' stay strings."""


_KeepWordsLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_KeepWordsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.1 reads '1e-5' (no dot) as a string; accept it as the float everyone means.
_KeepWordsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _coerce(default: Any, value: Any) -> Any:
    """Bridge booleans and yes/no words in both directions, as the user wrote them."""
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in BOOL_WORDS:
        return BOOL_WORDS[value.lower()]
    if isinstance(default, str) and isinstance(value, bool):
        for pair in _WORD_PAIRS:
            if default in pair:
                yes, no = ("yes", "no") if "yes" in pair else ("on", "off")
                return yes if value else no
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)            # DEVICE_ID 1 means the string '1'
    if isinstance(default, str) and isinstance(value, str):
        return _keep_string(value)
    return value


def _keep_string(value: str) -> str:
    """Protect a string from yacs' literal_eval of every value ('0' would become the int 0)."""
    try:
        decoded = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    return value if isinstance(decoded, str) else repr(value)


def _coerce_tree(defaults: _YacsNode, loaded: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in loaded.items():
        if isinstance(defaults, dict) and k in defaults:
            d = defaults[k]
            out[k] = _coerce_tree(d, v, f"{prefix}{k}.") if isinstance(v, dict) else _coerce(d, v)
        else:
            out[k] = v  # unknown key: yacs reports it by name
    return out


class CfgNode(_YacsNode):
    """yacs CfgNode with yes/no-preserving YAML, word/bool coercion and validation on freeze."""

    @classmethod
    def _load_cfg_from_yaml_str(cls, str_obj: str) -> CfgNode:
        return cls(yaml.load(str_obj, Loader=_KeepWordsLoader))

    def merge_from_file(self, cfg_filename: str) -> None:
        try:
            with open(cfg_filename) as f:
                loaded = yaml.load(f, Loader=_KeepWordsLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {cfg_filename}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {cfg_filename} is a folder, not a YAML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{cfg_filename} is not a text (YAML) file: byte {e.start} is not UTF-8 text; "
                              "give the YAML config file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or _one_line(e)
            raise ConfigError(f"{cfg_filename}:{where}: YAML syntax error: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{cfg_filename}: expected a mapping of config keys, got a {type(loaded).__name__}")
        loaded = _coerce_tree(self, loaded)
        try:
            self.merge_from_other_cfg(type(self)(loaded))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{cfg_filename}: {_one_line(e)}") from None

    def merge_from_list(self, cfg_list: list) -> None:
        if len(cfg_list) % 2:
            raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {cfg_list}")
        fixed = []
        for key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
            node: Any = self
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"unknown config key in overrides: {key}")
                node = node[part]
            # a string key takes the word as typed ('0,1' stays a string); others are decoded
            value = raw if isinstance(node, str) and isinstance(raw, str) else _YacsNode._decode_cfg_value(raw)
            fixed += [key, _coerce(node, value)]
        try:
            super().merge_from_list(fixed)
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"bad override: {_one_line(e)}") from None

    def freeze(self) -> None:
        validate(self)
        super().freeze()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e.args[0] if e.args else e).split())


def get_key(cfg: _YacsNode, key: str) -> Any:
    """The value of a dotted key such as ``SOLVER.STAGE2.BASE_LR``."""
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    """Config values equal as written: lists and tuples alike, ints and floats alike, a bool
    only equal to a bool."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    values = value if isinstance(value, (list, tuple)) else (value,)
    for v in values:
        if v not in allowed:
            raise ConfigError(
                f"{key} = {v!r} is not allowed; choose one of: {', '.join(map(repr, allowed))}"
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def validate(cfg: _YacsNode) -> None:
    """Check choice keys, inert keys and value ranges; raise ConfigError with a one-line message."""
    for key, allowed in {**CHOICES, "DATASETS.NAMES": DATASET_NAMES}.items():
        _check_choice(key, get_key(cfg, key), allowed)
    for key, why in INERT_KEYS.items():
        value, default = get_key(cfg, key), get_key(_DEFAULTS, key)
        if _same(value, default):
            continue
        raise ConfigError(f"{key} = {value!r} has no effect in this implementation ({why}); "
                          f"leave it at {default!r}")
    dev = cfg.MODEL.DEVICE
    if not (dev in ("cpu", "cuda", "auto") or (isinstance(dev, str) and re.fullmatch(r"cuda:\d+", dev))):
        raise ConfigError(f"MODEL.DEVICE = {dev!r} is not allowed; choose 'cpu', 'cuda', 'cuda:N' or 'auto' "
                          "(CUDA where it is usable, else the CPU)")
    if not re.fullmatch(r"\d+(,\d+)*", str(cfg.MODEL.DEVICE_ID)):
        raise ConfigError(f"MODEL.DEVICE_ID = {cfg.MODEL.DEVICE_ID!r} must list GPU numbers, e.g. '0' or '0,1'")
    for key in ("INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST", "MODEL.STRIDE_SIZE"):
        v = get_key(cfg, key)
        if len(v) != 2 or not all(_is_int(x) and x > 0 for x in v):
            raise ConfigError(f"{key} = {list(v)!r} must be two positive integers [height, width]")
    for key in ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD"):
        v = get_key(cfg, key)
        if len(v) != 3 or not all(_is_number(x) for x in v):
            raise ConfigError(f"{key} = {list(v)!r} must be three numbers, one per RGB channel")
    std = cfg.INPUT.PIXEL_STD
    if not all(x > 0 for x in std):
        raise ConfigError(f"INPUT.PIXEL_STD = {list(std)!r} must be > 0 in every channel (images are divided by it)")
    seed = cfg.SOLVER.SEED
    if not (_is_int(seed) and 0 <= seed < 2 ** 32):
        raise ConfigError(f"SOLVER.SEED = {seed!r} must be an integer in [0, 2**32 - 1] (numpy's seed range)")
    steps = cfg.SOLVER.STAGE2.STEPS
    if not all(_is_int(x) and x >= 1 for x in steps) or list(steps) != sorted(steps):
        raise ConfigError(f"SOLVER.STAGE2.STEPS = {list(steps)!r} must be positive integer epochs in increasing "
                          "order (the epochs where the learning rate is multiplied by GAMMA)")
    if not str(cfg.OUTPUT_DIR).strip():
        raise ConfigError(f"OUTPUT_DIR = {cfg.OUTPUT_DIR!r} must name a folder for the run's files, e.g. output/market")
    for key in ("INPUT.PROB", "INPUT.RE_PROB", "SOLVER.STAGE1.PROMPT_AUG_SCALE"):
        v = get_key(cfg, key)
        if not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"{key} = {v!r} must lie in [0, 1]")
    for key in ("SOLVER.STAGE1.IMS_PER_BATCH", "SOLVER.STAGE2.IMS_PER_BATCH", "TEST.IMS_PER_BATCH",
                "SOLVER.STAGE1.MAX_EPOCHS", "SOLVER.STAGE2.MAX_EPOCHS", "TEST.MAX_RANK",
                "TEST.RE_RANKING_K1", "TEST.RE_RANKING_K2", "DATALOADER.NUM_INSTANCE",
                "SOLVER.STAGE1.LOG_PERIOD", "SOLVER.STAGE1.CHECKPOINT_PERIOD", "SOLVER.STAGE1.EVAL_PERIOD",
                "SOLVER.STAGE2.LOG_PERIOD", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "SOLVER.STAGE2.EVAL_PERIOD",
                "TEST.VISUALIZE_N", "TEST.VISUALIZE_TOPK"):
        v = get_key(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} = {v!r} must be a positive integer")
    for key in ("DATALOADER.NUM_WORKERS", "DATALOADER.READ_RETRIES", "INPUT.PADDING"):
        v = get_key(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (-1 if key == "DATALOADER.NUM_WORKERS" else 0):
            auto = " (or -1: as many as the cores allow)" if key == "DATALOADER.NUM_WORKERS" else ""
            raise ConfigError(f"{key} = {v!r} must be an integer >= 0{auto}")
    for key in ("SOLVER.STAGE1.BASE_LR", "SOLVER.STAGE2.BASE_LR"):
        v = get_key(cfg, key)
        if not float(v) > 0:
            raise ConfigError(f"{key} = {v!r} must be > 0")
    k, batch = cfg.DATALOADER.NUM_INSTANCE, cfg.SOLVER.STAGE2.IMS_PER_BATCH
    if batch % k:
        raise ConfigError(f"SOLVER.STAGE2.IMS_PER_BATCH = {batch} must be a multiple of DATALOADER.NUM_INSTANCE "
                          f"= {k} (a batch is P identities x NUM_INSTANCE images)")
    if "triplet" in cfg.DATALOADER.SAMPLER and batch // k < 2:
        raise ConfigError(f"SOLVER.STAGE2.IMS_PER_BATCH = {batch} with DATALOADER.NUM_INSTANCE = {k} gives one "
                          "identity per batch: the triplet loss has no negatives and would be 0 all run; "
                          f"use IMS_PER_BATCH >= {2 * k}")
    if not 0.0 <= cfg.TEST.RE_RANKING_LAMBDA <= 1.0:
        raise ConfigError(f"TEST.RE_RANKING_LAMBDA = {cfg.TEST.RE_RANKING_LAMBDA!r} must lie in [0, 1]")
    if cfg.SOLVER.COMPILE and cfg.MODEL.SSL_SYNC_BN and cfg.MODEL.DIST_TRAIN:
        raise ConfigError("MODEL.SSL_SYNC_BN True with SOLVER.COMPILE True: SyncBatchNorm under torch.compile has "
                          "never been run here (it needs several GPUs); set one of them False")


def _on(flag: Any) -> str:
    return "on" if flag else "off"


def settings_summary(cfg: _YacsNode, config_path: str) -> list[str]:
    """The few settings that decide a training, as short lines for the console and the log
    (the full config is in ``config_path``): model, data, both stages, seed and compile."""
    m, s1, s2 = cfg.MODEL, cfg.SOLVER.STAGE1, cfg.SOLVER.STAGE2
    weights = m.PRETRAIN_PATH or "~/.cache/clip" if m.CLIP_INIT == "pretrained" else "random, not pre-trained"
    workers = "auto" if cfg.DATALOADER.NUM_WORKERS == -1 else cfg.DATALOADER.NUM_WORKERS
    lines = [f"Settings, every key in {config_path}:",
             f"  model {m.NAME}, CLIP weights {weights}, input {'x'.join(map(str, cfg.INPUT.SIZE_TRAIN))}, "
             f"camera embedding {_on(m.SIE_CAMERA)}, view embedding {_on(m.SIE_VIEW)}",
             f"  data {cfg.DATASETS.NAMES} under {cfg.DATASETS.ROOT_DIR}, sampler {cfg.DATALOADER.SAMPLER} with "
             f"{cfg.DATALOADER.NUM_INSTANCE} images per identity, loader workers {workers}"]
    if m.PROMPT_LEARNING:
        lines.append(f"  stage 1: {s1.MAX_EPOCHS} epochs, batch {s1.IMS_PER_BATCH}, lr {s1.BASE_LR:.2e}, "
                     "text SSL " + (f"on with weight {s1.SSL_LOSS_WEIGHT}" if m.USE_SSL_STAGE1 else "off"))
    else:
        lines.append("  stage 1: none, MODEL.PROMPT_LEARNING is off")
    ssl2 = f"{m.SSL_TYPE} with weight {s2.SSL_LOSS_WEIGHT}" if m.USE_SSL else "off"
    lines.append(f"  stage 2: {s2.MAX_EPOCHS} epochs, batch {s2.IMS_PER_BATCH}, lr {s2.BASE_LR:.2e} times "
                 f"{s2.GAMMA} at epochs {list(s2.STEPS)}, image SSL {ssl2}, evaluation every {s2.EVAL_PERIOD} epochs")
    lines.append(f"  seed {cfg.SOLVER.SEED}, compile {_on(cfg.SOLVER.COMPILE)}, "
                 f"distributed {_on(m.DIST_TRAIN)}, output {cfg.OUTPUT_DIR}")
    return lines


def get_default_config() -> CfgNode:
    """A fresh, unfrozen copy of the defaults."""
    return CfgNode(copy.deepcopy(_DEFAULTS))


cfg = get_default_config()


def load_config(config_file: str | None = None, opts: Iterable[str] | None = None,
                freeze: bool = True) -> CfgNode:
    """Defaults, then ``config_file``, then ``KEY VALUE`` overrides; validated and frozen."""
    c = get_default_config()
    if config_file:
        c.merge_from_file(config_file)
    if opts:
        c.merge_from_list(list(opts))
    if freeze:
        c.freeze()
    return c
