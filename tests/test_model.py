"""SVLL-ReID model: prompt learner, prompt augmentations, SIE, output shapes (ViT and RN50)."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from config import load_config
from model import SVLLReID, augment_prompts, clip, make_model, model_options_from_cfg
from model.make_model import build_clip
from model.prompts import N_CLS_CTX, N_PREFIX, PromptLearner

DEMO = "configs/demo/vit_svllreid_demo.yml"


def tiny_cfg(*opts):
    return load_config(DEMO, list(opts))


@pytest.fixture(scope="module")
def vit_model():
    torch.manual_seed(0)
    return make_model(tiny_cfg(), num_class=6, camera_num=3, view_num=1)


def test_prompt_learner_only_identity_slots_learnable():
    torch.manual_seed(0)
    emb = nn.Embedding(49408, 32)
    pl = PromptLearner(num_classes=5, dataset_name="market1501", token_embedding=emb)
    assert [n for n, p in pl.named_parameters()] == ["cls_ctx"]
    assert pl.template == "A photo of a X X X X person."
    assert PromptLearner(3, "veri", emb).template.endswith("vehicle.")
    labels = torch.tensor([3, 1, 3])
    prompts = pl(labels)
    ref = emb(clip.tokenize(pl.template))[0]
    assert prompts.shape == (3, 77, 32)
    # frozen template everywhere except the 4 identity positions, which are cls_ctx[label]
    keep = torch.ones(77, dtype=torch.bool)
    keep[N_PREFIX:N_PREFIX + N_CLS_CTX] = False
    assert torch.allclose(prompts[:, keep], ref[keep].expand(3, -1, -1))
    assert torch.equal(prompts[:, N_PREFIX:N_PREFIX + N_CLS_CTX], pl.cls_ctx[labels])
    prompts.sum().backward()
    touched = pl.cls_ctx.grad.abs().sum(dim=(1, 2)) > 0
    assert touched.tolist() == [False, True, False, True, False]


def test_model_is_built_from_options_not_from_the_config():
    """make_model == SVLLReID(clip, sizes, model_options_from_cfg(cfg)); the options alone decide."""
    cfg = tiny_cfg("TEST.NECK_FEAT", "after", "MODEL.SIE_COE", "1.5")
    opts = model_options_from_cfg(cfg)
    assert (opts.model_name, opts.neck_feat, opts.sie_coe, opts.ssl_type) == \
        (cfg.MODEL.NAME, "after", 1.5, cfg.MODEL.SSL_TYPE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.neck_feat = "before"
    torch.manual_seed(0)
    built = make_model(cfg, num_class=4, camera_num=3, view_num=1)
    torch.manual_seed(0)
    direct = SVLLReID(build_clip(cfg), 4, 3, 1, opts)
    assert built.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in built.state_dict().items())
    vehicle = SVLLReID(build_clip(cfg), 4, 3, 1, dataclasses.replace(opts, dataset_name="veri", use_ssl=False))
    assert vehicle.prompt_learner.template.endswith("vehicle.") and not hasattr(vehicle, "image_mlp")
    assert direct.neck_feat == "after" and direct.sie_coe == 1.5


def test_mask_zeroes_about_scale_of_elements():
    torch.manual_seed(0)
    x = torch.randn(16, 77, 64) + 5.0       # no natural zeros
    for scale in (0.1, 0.5, 0.8):
        frac = (augment_prompts(x, "mask", scale) == 0).float().mean().item()
        assert abs(frac - scale) < 0.01
    out = augment_prompts(x, "mask", 0.5)
    assert torch.equal(out[out != 0], x[out != 0])          # surviving elements untouched


def test_swap_only_permutes_chosen_positions():
    torch.manual_seed(0)
    x = torch.randn(8, 77, 16)
    scale = 0.3
    out = augment_prompts(x, "swap", scale)
    m = int(scale * 77)
    for b in range(8):
        moved = (out[b] != x[b]).any(dim=1)
        assert 2 <= moved.sum().item() <= m                 # at most the chosen positions move
        # rows are a permutation of the original rows
        assert torch.equal(torch.sort(out[b], dim=0).values, torch.sort(x[b], dim=0).values)
        # moved rows come from other moved positions only
        src = x[b][moved]
        for row in out[b][moved]:
            assert (row == src).all(dim=1).any()


def test_mix_is_convex_with_another_prompt():
    torch.manual_seed(0)
    x = torch.randn(6, 77, 8)
    s = 0.25
    out = augment_prompts(x, "mix", s)
    for i in range(6):
        partners = [j for j in range(6) if torch.allclose(out[i], (1 - s) * x[i] + s * x[j], atol=1e-6)]
        assert partners and i not in partners


def test_unknown_augmentation_is_an_error():
    with pytest.raises(ValueError, match="PROMPT_AUG_METHOD"):
        augment_prompts(torch.zeros(2, 77, 4), "foo", 0.5)


def test_text_encoder_matches_clip_encode_text():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    from model.make_model import build_clip
    from model.prompts import TextEncoder
    c = build_clip(cfg).eval()
    tokens = clip.tokenize(["A photo of a X X X X person."] * 2)
    enc = TextEncoder(c)
    assert torch.allclose(enc(c.token_embedding(tokens), tokens[:1]), c.encode_text(tokens), atol=1e-5)


def test_vit_outputs_and_neck(vit_model):
    m = vit_model
    x = torch.randn(4, 3, 128, 64)
    y, cam = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])
    m.train()
    out = m(x, y, cam, ssl_views=(x, x.flip(-1)), mode="stage2")
    assert [tuple(s.shape) for s in out["scores"]] == [(4, 6), (4, 6)]
    assert out["ssl"]["aug1_embed"].shape == (4, 64)
    m.eval()
    with torch.no_grad():
        before = m(x, cam_label=cam)
        m.neck_feat = "after"
        after = m(x, cam_label=cam)
        m.neck_feat = "before"
        last, feat, proj = m._image_features(x, m._sie(cam, None))
    assert before.shape == after.shape == (4, 128)
    assert torch.allclose(before, torch.cat([feat, proj], 1))
    assert torch.allclose(after, torch.cat([m.bottleneck(feat), m.bottleneck_proj(proj)], 1))


def test_sie_camera_and_view_index():
    torch.manual_seed(0)
    m = make_model(tiny_cfg("MODEL.SIE_VIEW", "True"), num_class=4, camera_num=3, view_num=2)
    assert m.cv_embed.shape == (6, 64)
    cam, view = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])
    assert torch.equal(m._sie(cam, view), m.sie_coe * m.cv_embed[cam * 2 + view])
    # SIE only acts through the class token: zero embedding == no embedding
    x = torch.randn(2, 3, 128, 64)
    m.eval()
    with torch.no_grad():
        a = m._image_features(x, None)[1]
        b = m._image_features(x, torch.zeros(2, 64))[1]
        c = m._image_features(x, m._sie(cam[:2], view[:2]))[1]
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.slow
@pytest.mark.parametrize("ssl_type", ["SIMCLR", "SIMSIAM"])
def test_rn50_with_vision_ssl(ssl_type):
    """RN50 + vision SSL works (the published code crashed: MLP width taken from the stem)."""
    torch.manual_seed(0)
    cfg = tiny_cfg("MODEL.NAME", "RN50", "MODEL.SIE_CAMERA", "False", "MODEL.SSL_TYPE", ssl_type,
                   "MODEL.CLIP_ARCH.VISION_LAYERS", "1", "MODEL.CLIP_ARCH.VISION_WIDTH", "16",
                   "MODEL.STRIDE_SIZE", "[16, 16]")
    m = make_model(cfg, num_class=4, camera_num=1, view_num=1)
    last_dim, feat_dim, proj_dim = m.feature_dims
    assert feat_dim == 2 * last_dim
    x = torch.randn(4, 3, 128, 64)
    m.train()
    out = m(x, torch.arange(4), ssl_views=(x, x.flip(-1)), mode="stage2")
    assert [f.shape[1] for f in out["feats"]] == [last_dim, feat_dim, proj_dim]
    if ssl_type == "SIMCLR":
        assert out["ssl"]["aug1_embed"].shape == (4, 64)
    else:
        assert out["ssl"]["p1"].shape == out["ssl"]["z1"].shape == (4, feat_dim)


@pytest.mark.parametrize("mode", ["stage_2", "eval", "retrieval"])
def test_forward_refuses_an_unknown_mode(vit_model, mode):
    with pytest.raises(ValueError, match=f"mode '{mode}' is not one of"):
        vit_model(torch.randn(2, 3, 128, 64), mode=mode)


@pytest.mark.slow
def test_retrieval_features_with_and_without_camera_labels():
    """One retrieval entry point: camera labels select the SIE row; without them the SIE is dropped
    and that warns once; sie_at_test False leaves SIE out on purpose, silently."""
    import warnings
    torch.manual_seed(0)
    m = make_model(tiny_cfg(), num_class=4, camera_num=3, view_num=1).eval()
    x, cam = torch.randn(3, 3, 128, 64), torch.tensor([2, 0, 1])
    with torch.no_grad():
        _, feat, proj = m._image_features(x, m.sie_coe * m.cv_embed[cam])
        _, feat0, proj0 = m._image_features(x, None)
        with_cam = m.retrieval_features(x, cam_label=cam)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            no_cam = m.retrieval_features(x)
            again = m.retrieval_features(x)
            via_forward = m(x, cam_label=cam)
        m.sie_at_test = False
        with warnings.catch_warnings(record=True) as silent:
            warnings.simplefilter("always")
            off = m.retrieval_features(x, cam_label=cam)
    assert m.feat_dim == 128 and with_cam.shape == (3, 128)
    assert torch.allclose(with_cam, torch.cat([feat, proj], 1)) and torch.equal(via_forward, with_cam)
    assert torch.allclose(no_cam, torch.cat([feat0, proj0], 1)) and torch.equal(no_cam, again)
    assert not torch.allclose(with_cam, no_cam, atol=1e-4)      # the trap the warning is about
    assert len(caught) == 1 and "cam_label" in str(caught[0].message)
    assert not silent and torch.equal(off, no_cam)
    # a model without SIE never warns and ignores labels
    plain = make_model(tiny_cfg("MODEL.SIE_CAMERA", "False"), num_class=4, camera_num=3, view_num=1).eval()
    with warnings.catch_warnings(record=True) as none, torch.no_grad():
        warnings.simplefilter("always")
        assert torch.equal(plain.retrieval_features(x), plain.retrieval_features(x, cam_label=cam))
    assert not none and not plain.has_sie


@pytest.mark.slow
def test_evaluation_features_are_retrieval_features(tiny_root):
    """processor.extract_features (what evaluation ranks) == retrieval_features with the labels."""
    from datasets.make_dataloader import build_dataset_from_cfg, make_val_loader
    from processor import extract_features
    from processor.batches import device_transform_of, to_device
    cfg = tiny_cfg("DATASETS.ROOT_DIR", tiny_root, "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
                   "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "5")
    torch.manual_seed(0)
    dataset = build_dataset_from_cfg(cfg, test_only=True)
    m = make_model(cfg, num_class=4, camera_num=dataset.num_train_cams, view_num=1)
    loader, _ = make_val_loader(cfg, dataset)
    feats, pids, camids = extract_features(cfg, m, loader, torch.device("cpu"))
    m.eval()
    with torch.no_grad():
        batches = [to_device(b, torch.device("cpu"), device_transform_of(loader)) for b in loader]
        direct = torch.cat([m.retrieval_features(b["img"], b["camid"], b["viewid"]) for b in batches])
    assert torch.allclose(feats, direct, atol=1e-6)
    assert torch.equal(camids, torch.tensor([s[2] for s in dataset.query + dataset.gallery]))
