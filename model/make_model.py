"""The SVLL-ReID model: CLIP image encoder + BNNeck/classifiers, per-identity prompts, SSL heads
(the heads in :mod:`model.heads`, the prompts in :mod:`model.prompts`).

One ``nn.Module`` whose ``forward`` dispatches on a ``mode`` keyword so that every
training computation goes through ``forward`` (needed for DistributedDataParallel):

- ``mode='stage1'``: text features of the batch labels' prompts (+ language-SSL embeddings);
- ``mode='stage2'`` (training): classifier scores, the three features, vision-SSL outputs;
- ``mode='image_proj'``: projected CLS feature (stage-1 cache);
- ``mode='text'``: text features of the given labels (stage-2 class text features);
- default in eval mode: the retrieval feature (TEST.NECK_FEAT 'before' or 'after').
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import clip
from .heads import init_bn_neck, init_classifier, init_image_ssl_head, prediction_mlp, projection_mlp
from .prompts import PromptLearner, TextEncoder, augment_prompts

logger = logging.getLogger("svllreid")

FORWARD_MODES = (None, "stage1", "stage2", "image_proj", "text")   # None: training outputs or retrieval feature


@torch.compiler.disable
def unique_labels(label: torch.Tensor) -> torch.Tensor:
    """``torch.unique(label)``, run eagerly under ``torch.compile`` (its size depends on the values),
    with that size marked dynamic: one compiled graph then serves every number of identities."""
    labels = torch.unique(label)
    torch._dynamo.maybe_mark_dynamic(labels, 0)
    return labels


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class SVLLReIDOptions:
    """Everything :class:`SVLLReID` is configured by besides the CLIP towers and the data sizes.

    Built from a config by :func:`model_options_from_cfg` (the one place that maps config keys
    to the model); ``model.loading`` overrides some fields from the checkpoint it loads.
    """

    model_name: str            # MODEL.NAME: 'ViT-B-16' or 'RN50' (SIE and feature pooling follow it)
    neck_feat: str             # TEST.NECK_FEAT: retrieval feature 'before' or 'after' the BNNeck
    dataset_name: str          # DATASETS.NAMES: picks the prompt noun (person / vehicle)
    prompt_learning: bool      # MODEL.PROMPT_LEARNING: build the per-identity prompts and text encoder
    use_ssl: bool              # MODEL.USE_SSL: build the image SSL head (stage 2)
    ssl_type: str              # MODEL.SSL_TYPE: 'SIMCLR' or 'SIMSIAM'
    ssl_hidden_dim: int        # MODEL.SSL_HIDDEN_DIM: SimCLR projection head widths
    ssl_out_dim: int           # MODEL.SSL_OUT_DIM
    use_ssl_stage1: bool       # MODEL.USE_SSL_STAGE1: text SSL head (only with prompt_learning)
    prompt_aug_method: str     # SOLVER.STAGE1.PROMPT_AUG_METHOD: 'mask', 'swap' or 'mix'
    prompt_aug_scale: float    # SOLVER.STAGE1.PROMPT_AUG_SCALE
    sie_camera: bool           # MODEL.SIE_CAMERA: camera side-information embedding (ViT only)
    sie_view: bool             # MODEL.SIE_VIEW: view side-information embedding (ViT only)
    sie_coe: float             # MODEL.SIE_COE: weight of the embedding added to the class token


def model_options_from_cfg(cfg: Any) -> SVLLReIDOptions:
    """The model options a config asks for: the only place config keys reach :class:`SVLLReID`."""
    m = cfg.MODEL
    return SVLLReIDOptions(
        model_name=m.NAME, neck_feat=cfg.TEST.NECK_FEAT, dataset_name=cfg.DATASETS.NAMES,
        prompt_learning=m.PROMPT_LEARNING, use_ssl=m.USE_SSL, ssl_type=m.SSL_TYPE,
        ssl_hidden_dim=m.SSL_HIDDEN_DIM, ssl_out_dim=m.SSL_OUT_DIM, use_ssl_stage1=m.USE_SSL_STAGE1,
        prompt_aug_method=cfg.SOLVER.STAGE1.PROMPT_AUG_METHOD, prompt_aug_scale=cfg.SOLVER.STAGE1.PROMPT_AUG_SCALE,
        sie_camera=m.SIE_CAMERA, sie_view=m.SIE_VIEW, sie_coe=m.SIE_COE)


class SVLLReID(nn.Module):
    """CLIP-based ReID model (ViT-B-16 or RN50); see docs/method.md, sections 1-4.

    ``clip_model`` supplies the towers; ``num_classes`` sizes the classifiers and prompts;
    ``camera_num`` x ``view_num`` size the SIE table; ``options`` (see
    :func:`model_options_from_cfg`) says what else to build and how retrieval behaves.
    """

    def __init__(self, clip_model: nn.Module, num_classes: int, camera_num: int, view_num: int,
                 options: SVLLReIDOptions) -> None:
        super().__init__()
        self.model_name = options.model_name
        self.is_vit = self.model_name.startswith("ViT")
        self.num_classes = num_classes
        self.neck_feat = options.neck_feat
        self.ssl_type = options.ssl_type
        self.use_ssl = options.use_ssl
        self.use_ssl_stage1 = options.use_ssl_stage1 and options.prompt_learning
        self.prompt_aug_method = options.prompt_aug_method
        self.prompt_aug_scale = options.prompt_aug_scale

        self.feature_dims = tuple(clip_model.image_feature_dims)   # (last, feature, proj) widths
        _, self.in_planes, self.in_planes_proj = self.feature_dims
        self.image_encoder = clip_model.visual

        # BNNeck + classifiers on img_feature and img_feature_proj
        self.bottleneck = nn.BatchNorm1d(self.in_planes)
        self.bottleneck_proj = nn.BatchNorm1d(self.in_planes_proj)
        init_bn_neck(self.bottleneck)
        init_bn_neck(self.bottleneck_proj)
        self.classifier = nn.Linear(self.in_planes, num_classes, bias=False)
        self.classifier_proj = nn.Linear(self.in_planes_proj, num_classes, bias=False)
        init_classifier(self.classifier)
        init_classifier(self.classifier_proj)

        # Side information embedding added to the class token (ViT only)
        self.sie_camera, self.sie_view = options.sie_camera, options.sie_view
        self.sie_coe, self.camera_num, self.view_num = options.sie_coe, camera_num, view_num
        rows = {(True, True): camera_num * view_num, (True, False): camera_num,
                (False, True): view_num}.get((self.sie_camera, self.sie_view), 0)
        if rows and not self.is_vit:
            logger.warning("SIE is a ViT feature; ignored for %s", self.model_name)
            rows = 0
        if not rows:
            self.sie_camera = self.sie_view = False
        self.cv_embed = nn.Parameter(torch.zeros(rows, self.in_planes)) if rows else None
        if self.cv_embed is not None:
            nn.init.trunc_normal_(self.cv_embed, std=0.02)
        # Whether retrieval uses the SIE table: None = use it whenever labels are given (own
        # dataset, training-time evaluation); False = decided off (cross-dataset, TEST.USE_SIE no).
        self.sie_at_test: bool | None = None
        self._warned_no_sie = False

        # Text side: per-identity prompts and the frozen text encoder
        self.prompt_learning = options.prompt_learning
        if self.prompt_learning:
            self.prompt_learner = PromptLearner(num_classes, options.dataset_name, clip_model.token_embedding)
            self.text_encoder = TextEncoder(clip_model)
            for p in self.text_encoder.parameters():
                p.requires_grad_(False)

        # Self-supervision heads. The image SSL feature is the ln_post CLS (ViT) or pooled layer4 (RN50).
        hidden, out = options.ssl_hidden_dim, options.ssl_out_dim
        if self.use_ssl:   # one name for both heads, as the published code
            if self.ssl_type == "SIMCLR":
                self.image_mlp = projection_mlp(self.in_planes, hidden, out)
            else:
                self.image_mlp = prediction_mlp(self.in_planes)
            init_image_ssl_head(self.image_mlp)
        if self.use_ssl_stage1:
            self.text_mlp = projection_mlp(self.in_planes_proj, hidden, out)
        self._trainable_at_init = {n: p.requires_grad for n, p in self.named_parameters()}
        self.stage: int | None = None   # set by set_stage: the optimisers train what it leaves trainable

    def sync_ssl_batchnorm(self) -> None:
        """SyncBatchNorm in the SSL heads (multi-GPU; torch has no CPU SyncBatchNorm)."""
        for name in ("image_mlp", "text_mlp"):
            if hasattr(self, name):
                setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self, name)))

    def set_stage(self, stage: int, train_text_mlp: bool = False) -> None:
        """Set ``requires_grad`` for a training stage (also what DistributedDataParallel syncs).

        Stage 1: only the prompt learner (and the text SSL head when ``train_text_mlp``).
        Stage 2: everything trainable at construction except the text side (text encoder,
        prompt learner, text SSL head), which stage 2 does not use.
        """
        self.stage = stage
        text_side = ("prompt_learner.", "text_encoder.", "text_mlp.")
        for name, p in self.named_parameters():
            if stage == 1:
                p.requires_grad_(name.startswith("prompt_learner.")
                                 or (train_text_mlp and name.startswith("text_mlp.")))
            else:
                p.requires_grad_(self._trainable_at_init[name] and not name.startswith(text_side))

    # -------------------------------------------------------------- pieces
    def _sie(self, cam_label: torch.Tensor | None, view_label: torch.Tensor | None) -> torch.Tensor | None:
        if self.cv_embed is None:
            return None
        if self.sie_camera and self.sie_view:
            idx = cam_label * self.view_num + view_label
        else:
            idx = cam_label if self.sie_camera else view_label
        if idx is None:
            return None
        return self.sie_coe * self.cv_embed[idx]

    def _image_features(self, x: torch.Tensor, cv_emb: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(img_feature_last, img_feature, img_feature_proj), each (B, C). Every image entry comes here;
        uint8 images (a loader's batch not finished by its device transform) are refused."""
        if x.dtype == torch.uint8:
            raise TypeError("SVLLReID: got uint8 images; the model takes normalised float images: move loader batches "
                            "with processor.batches.to_device(batch, device, device_transform_of(loader))")
        last, feat, proj = self.image_encoder(x, cv_emb)
        if self.is_vit:
            return last[:, 0], feat[:, 0], proj[:, 0]
        return last.mean(dim=(2, 3)), feat.mean(dim=(2, 3)), proj[:, 0]

    def _ssl_image(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vision SSL outputs of two views, encoded without SIE."""
        if self.is_vit:   # LayerNorm only: one batched pass equals two separate passes
            f = self._image_features(torch.cat([v1, v2]))[1]
            f1, f2 = f.chunk(2)
        else:             # BatchNorm: keep per-view batch statistics
            f1, f2 = self._image_features(v1)[1], self._image_features(v2)[1]
        if self.ssl_type == "SIMCLR":
            return {"aug1_embed": self.image_mlp(f1), "aug2_embed": self.image_mlp(f2)}
        return {"p1": self.image_mlp(f1), "p2": self.image_mlp(f2), "z1": f1, "z2": f2}

    def encode_text(self, label: torch.Tensor) -> torch.Tensor:
        """Text features (B, proj_dim) of the identity prompts."""
        prompts = self.prompt_learner(label)
        return self.text_encoder(prompts, self.prompt_learner.tokenized_prompts)

    def _ssl_text(self, label: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """Language SSL: two augmented copies of each unique label's prompt, encoded and projected.
        ``labels``: the unique labels when the caller has them (from host labels: no device sync)."""
        if labels is None:
            labels = unique_labels(label)
        if labels.numel() < 2:     # BatchNorm in the MLP and SimCLR negatives need >= 2 prompts
            return None
        prompts = self.prompt_learner(labels)
        tok = self.prompt_learner.tokenized_prompts
        views = [augment_prompts(prompts, self.prompt_aug_method, self.prompt_aug_scale) for _ in range(2)]
        f1, f2 = self.text_encoder(torch.cat(views), tok).chunk(2)   # LayerNorm only: batched = per view
        # The head's BatchNorm (train mode in stage 1) sees each view on its own, as published.
        return {"aug1_embed": self.text_mlp(f1), "aug2_embed": self.text_mlp(f2)}

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor | None = None, label: torch.Tensor | None = None,
                cam_label: torch.Tensor | None = None, view_label: torch.Tensor | None = None,
                ssl_views: tuple[torch.Tensor, torch.Tensor] | None = None,
                mode: str | None = None, unique_label: torch.Tensor | None = None) -> Any:
        """See the module docstring for ``mode``; ``unique_label`` (stage 1, optional): the sorted
        unique values of ``label``, when the caller computed them on the host."""
        if mode not in FORWARD_MODES:
            raise ValueError(f"SVLLReID.forward: mode {mode!r} is not one of {FORWARD_MODES}")
        if mode == "text":
            return self.encode_text(label)
        if mode == "stage1":
            out = {"text_features": self.encode_text(label)}
            out["ssl"] = self._ssl_text(label, unique_label) if self.use_ssl_stage1 else None
            return out
        if mode == "image_proj":
            return self._image_features(x)[2]

        if not (self.training or mode == "stage2"):
            return self.retrieval_features(x, cam_label, view_label)
        last, feat, proj = self._image_features(x, self._sie(cam_label, view_label))
        feat_bn, proj_bn = self.bottleneck(feat), self.bottleneck_proj(proj)
        out = {"scores": [self.classifier(feat_bn), self.classifier_proj(proj_bn)],
               "feats": [last, feat, proj], "img_feature_proj": proj, "ssl": None}
        if self.use_ssl and ssl_views is not None:
            out["ssl"] = self._ssl_image(*ssl_views)
        return out

    # -------------------------------------------------------------- retrieval
    @property
    def feat_dim(self) -> int:
        """Width of the retrieval feature (img_feature and img_feature_proj concatenated)."""
        return self.in_planes + self.in_planes_proj

    @property
    def has_sie(self) -> bool:
        """True when the model holds a trained camera and/or view embedding table."""
        return self.cv_embed is not None

    def retrieval_features(self, images: torch.Tensor, cam_label: torch.Tensor | None = None,
                           view_label: torch.Tensor | None = None) -> torch.Tensor:
        """The evaluation feature (B, feat_dim): concat(img_feature, img_feature_proj), before or
        after the BNNeck (TEST.NECK_FEAT). Evaluation and every tool go through here.

        With a trained SIE table the camera (and/or view) label selects the embedding added to
        the class token; without the label the embedding is dropped, which changes the feature,
        so that case warns once. When ``sie_at_test`` is False (cross-dataset evaluation or
        TEST.USE_SIE no) the labels are ignored on purpose and nothing is warned. Call in eval mode.
        """
        cv_emb = None
        if self.cv_embed is not None and self.sie_at_test is not False:
            need = [n for n, flag, lab in (("cam_label", self.sie_camera, cam_label),
                                           ("view_label", self.sie_view, view_label)) if flag and lab is None]
            if need:
                if not self._warned_no_sie:
                    self._warned_no_sie = True
                    warnings.warn(f"the model was trained with a side-information embedding (SIE) but "
                                  f"retrieval_features got no {' / '.join(need)}: the embedding is left out, "
                                  f"which usually costs accuracy; pass the labels, or set sie_at_test = False "
                                  f"(TEST.USE_SIE no) to do this on purpose", UserWarning, stacklevel=2)
            else:
                cv_emb = self._sie(cam_label, view_label)
        _, feat, proj = self._image_features(images, cv_emb)
        if self.neck_feat == "after":
            return torch.cat([self.bottleneck(feat), self.bottleneck_proj(proj)], dim=1)
        return torch.cat([feat, proj], dim=1)

    # -------------------------------------------------------------- checkpoints
    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as the published code's model of the same configuration holds it.

        Every key has the published name and shape, so the published ``load_param`` (which
        copies every key it finds) accepts the file. Left out, both training-only:
        the text SSL head of a SimSiam model (the published SimSiam model has none), and both
        SSL heads of an RN50 model (the published RN50 heads take the stem width, 64, and the
        ViT text width, 512, as input, not the RN50 features' 2048 and 1024, so they cannot hold
        ours). ``last.pth`` keeps everything for ``--resume``.
        """
        drop = []
        if self.ssl_type == "SIMSIAM" or not self.is_vit:
            drop.append("text_mlp.")
        if not self.is_vit:
            drop.append("image_mlp.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(tuple(drop))}


# ----------------------------------------------------------------------------- factory
def feature_grid(cfg: Any) -> tuple[int, int]:
    """Token grid (h, w) of the image tower for INPUT.SIZE_TRAIN and MODEL.STRIDE_SIZE."""
    h, w = cfg.INPUT.SIZE_TRAIN
    if cfg.MODEL.NAME.startswith("ViT"):
        patch = cfg.MODEL.CLIP_ARCH.VISION_PATCH_SIZE or 16
        sh, sw = cfg.MODEL.STRIDE_SIZE
        return (h - patch) // sh + 1, (w - patch) // sw + 1
    return h // 16, w // 16    # RN50 with layer4 stride 1: total stride 16


def build_clip(cfg: Any) -> nn.Module:
    """CLIP from MODEL.PRETRAIN_PATH, or OpenAI's weights for MODEL.NAME (``~/.cache/clip/<NAME>.pt``,
    downloaded on first use; never when MODEL.PRETRAIN_PATH is set), or random init."""
    h, w = feature_grid(cfg)
    stride = cfg.MODEL.STRIDE_SIZE[0]
    if cfg.MODEL.CLIP_INIT == "random":
        a = cfg.MODEL.CLIP_ARCH
        logger.warning("MODEL.CLIP_INIT = 'random': no CLIP pre-training; results are not comparable "
                       "to the paper")
        return clip.build_random_clip(
            cfg.MODEL.NAME, h, w, stride, embed_dim=a.EMBED_DIM, vision_width=a.VISION_WIDTH,
            vision_layers=a.VISION_LAYERS, vision_patch_size=a.VISION_PATCH_SIZE,
            text_width=a.TEXT_WIDTH, text_heads=a.TEXT_HEADS, text_layers=a.TEXT_LAYERS)
    pretrain = cfg.MODEL.PRETRAIN_PATH
    path = clip.resolve_checkpoint(pretrain or cfg.MODEL.NAME, download=not pretrain)
    logger.info("Loading CLIP weights from %s", path)
    return clip.load_clip(path, h, w, stride)


def move_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` moved to ``device``; on CUDA a convolutional (RN50) tower is put in channels_last
    layout, the one cuDNN's tensor-core convolutions use (the values stay; the files keep the keys)."""
    model = model.to(device)
    if device.type == "cuda" and not getattr(model, "is_vit", True):
        model = model.to(memory_format=torch.channels_last)
    return model


def make_model(cfg: Any, num_class: int, camera_num: int, view_num: int) -> SVLLReID:
    """Build the SVLL-ReID model (docs/method.md) for ``num_class`` training identities:
    CLIP from :func:`build_clip`, options from :func:`model_options_from_cfg`."""
    model = SVLLReID(build_clip(cfg), num_class, camera_num, view_num, model_options_from_cfg(cfg))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model %s: %d identities, %.2fM trainable parameters", cfg.MODEL.NAME, num_class, n_train / 1e6)
    return model
