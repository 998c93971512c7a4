"""CLIP backbone: parity with open_clip (random weights), ReID changes, weight loading.

open_clip's ``ViT-B-16-quickgelu`` / ``RN50-quickgelu`` use OpenAI's parameter names and
activations. Their random init leaves biases at 0, LayerNorm at (1, 0) and the last BN of
every ResNet block at 0, so all of those are perturbed first: a wrong bias, norm or
residual path then shows up as a mismatch.
"""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")

from model import clip  # noqa: E402
from model.clip import download, loader  # noqa: E402

ATOL = 1e-4
TEXTS = [
    "A photo of a X X X X person.",
    "a photo of a red vehicle.",
    "",
    "Hello &amp; goodbye, caf\u00e9!",
    "word " * 100,  # truncated: eot at position 76
]


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move 1-d parameters (biases, norm affines, class token) and BN statistics off their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.mul_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < atol, f"max abs diff {diff:.3g} (reference magnitude {ref.abs().max().item():.3g})"


def _tiny(name: str = "ViT-B-16", h: int = 14, w: int = 14, stride: int = 16, **kw) -> clip.CLIP:
    arch = dict(embed_dim=64, vision_width=64, vision_layers=2, text_width=64, text_heads=2, text_layers=2)
    arch.update(kw)
    return _perturb(clip.build_random_clip(name, h, w, stride, **arch))


@pytest.fixture(scope="module")
def vit_pair():
    torch.manual_seed(0)
    ref = _perturb(open_clip.create_model("ViT-B-16-quickgelu"))
    ours = clip.build_model(ref.state_dict(), 14, 14, 16)
    return ref, ours


@pytest.fixture(scope="module")
def rn_pair():
    torch.manual_seed(1)
    ref = _perturb(open_clip.create_model("RN50-quickgelu"))
    ours = clip.build_model(ref.state_dict(), 7, 7, 16)  # 112 px with layer4 stride 1 -> 7x7 map: no resize
    return ref, ours


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(2)
    return _tiny()


# ------------------------------------------------------------------------------- ViT-B-16
@pytest.mark.slow
def test_vit_b16_image_parity(vit_pair):
    ref, ours = vit_pair
    x = torch.randn(1, 3, 224, 224)
    captured = {}
    blocks = ref.visual.transformer.resblocks
    hooks = [blocks[-2].register_forward_hook(lambda m, i, o: captured.__setitem__("x11", o)),
             blocks[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("x12", o))]
    try:
        with torch.no_grad():
            ref_proj = ref.encode_image(x)
            x11, x12, xproj = ours.visual(x)
    finally:
        for h in hooks:
            h.remove()
    assert x11.shape == x12.shape == (1, 197, 768) and xproj.shape == (1, 197, 512)
    _assert_close(x11, captured["x11"])
    _assert_close(x12, ref.visual.ln_post(captured["x12"]))
    _assert_close(xproj[:, 0], ref_proj)
    assert ours.image_feature_dims == (768, 768, 512)
    assert (ours.embed_dim, ours.vision_width, ours.dtype) == (512, 768, torch.float32)


@pytest.mark.slow
def test_vit_b16_text_parity(vit_pair):
    ref, ours = vit_pair
    tokens = clip.tokenize(TEXTS)
    with torch.no_grad():
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens))


def test_encode_token_embeddings_equals_encode_text(tiny_vit):
    ours = tiny_vit
    tokens = clip.tokenize(TEXTS)
    with torch.no_grad():
        direct = ours.encode_text(tokens)
        via_embeddings = ours.encode_token_embeddings(ours.token_embedding(tokens), tokens)
    torch.testing.assert_close(via_embeddings, direct, rtol=0, atol=1e-6)


def test_text_transformer_is_causal(tiny_vit):
    """Changing a later token must not change earlier positions' outputs."""
    x = torch.randn(2, 77, 64)
    y = x.clone()
    y[:, 40:] += 1.0
    with torch.no_grad():
        a, b = tiny_vit.transformer(x), tiny_vit.transformer(y)
    torch.testing.assert_close(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


# ------------------------------------------------------------------------------- RN50
def _stride1_layer4(ref_visual: nn.Module) -> nn.Module:
    """open_clip's layer4 with the anti-aliasing pools of its first block removed (= stride 1)."""
    layer4 = copy.deepcopy(ref_visual.layer4)
    layer4[0].avgpool = nn.Identity()
    layer4[0].downsample[0] = nn.Identity()  # the "-1" AvgPool2d
    return layer4


def _attnpool_reference(pool: nn.Module, fmap: torch.Tensor, posemb: torch.Tensor) -> torch.Tensor:
    """All output tokens of CLIP's attention pool, via torch's reference MHA (batch-first out)."""
    x = fmap.flatten(2).permute(2, 0, 1)  # (HW, N, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x]) + posemb[:, None]
    out, _ = F.multi_head_attention_forward(
        x, x, x, x.shape[-1], pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight)
    return out.transpose(0, 1)


@pytest.mark.slow
def test_rn50_parity_layer_by_layer(rn_pair):
    """Our stride-1 layer4 = open_clip's layer4 without its anti-aliasing pools; the attention
    pool (unresized 7x7 positional embedding) matches torch's reference MHA on every token."""
    ref, ours = rn_pair
    rv = ref.visual
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        x3, x4, tokens = ours.visual(x)
        ref3 = rv.layer3(rv.layer2(rv.layer1(rv.stem(x))))
        ref4 = _stride1_layer4(rv)(ref3)
        ref_tokens = _attnpool_reference(rv.attnpool, ref4, rv.attnpool.positional_embedding)
        ref_pooled = rv.attnpool(ref4)
    assert x3.shape == (1, 1024, 7, 7) and x4.shape == (1, 2048, 7, 7) and tokens.shape == (1, 50, 1024)
    _assert_close(x3, ref3)
    _assert_close(x4, ref4)
    _assert_close(tokens, ref_tokens)
    _assert_close(tokens[:, 0], ref_pooled)
    assert ours.image_feature_dims == (1024, 2048, 1024) and ours.embed_dim == 1024


@pytest.mark.slow
def test_rn50_attnpool_parity_on_open_clip_map(rn_pair):
    """Our attention pool on open_clip's own (stride-2) layer4 map gives its encode_image."""
    ref, ours = rn_pair
    rv = ref.visual
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref4 = rv.layer4(rv.layer3(rv.layer2(rv.layer1(rv.stem(x)))))
        _assert_close(ours.visual.attnpool(ref4)[:, 0], ref.encode_image(x))


@pytest.mark.slow
def test_rn50_text_parity(rn_pair):
    ref, ours = rn_pair
    tokens = clip.tokenize(TEXTS[:2])
    with torch.no_grad():
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens))


def test_rn_reid_grid_shapes_and_resize():
    sd = _tiny("RN50", 7, 7, vision_width=8, vision_layers=1).state_dict()  # pretrained 7x7 grid
    model = clip.build_model(sd, 16, 8, 16)  # 256x128 input, layer4 stride 1 -> 16x8 map
    torch.testing.assert_close(model.visual.attnpool.positional_embedding,
                               clip.resize_pos_embed(sd["visual.attnpool.positional_embedding"], (16, 8)))
    with torch.no_grad():
        x3, x4, tokens = model.visual(torch.randn(2, 3, 256, 128))
    assert x3.shape == (2, 8 * 16, 16, 8) and x4.shape == (2, 8 * 32, 16, 8)
    assert tokens.shape == (2, 1 + 16 * 8, 64)
    assert model.image_feature_dims == (128, 256, 64)


# ------------------------------------------------------------------------------- ReID changes
def test_overlapping_stride_grid():
    model = _tiny(h=21, w=10, stride=12)
    assert model.visual.conv1.stride == (12, 12)
    with torch.no_grad():
        x11, x12, xproj = model.visual(torch.randn(2, 3, 256, 128))
    assert x11.shape == x12.shape == (2, 21 * 10 + 1, 64) and xproj.shape == (2, 211, 64)
    with pytest.raises(ValueError, match="patch grid"):
        model.visual(torch.randn(1, 3, 224, 224))


def test_resize_pos_embed_unchanged_grid_is_identity():
    pos = torch.randn(197, 32)
    assert torch.equal(clip.resize_pos_embed(pos, (14, 14)), pos)


def test_resize_pos_embed_is_bilinear_on_the_grid():
    """Halving with bilinear/align_corners=False averages 2x2 cells; checks orientation too."""
    pos = torch.randn(1 + 14 * 14, 8)
    grid = pos[1:].reshape(14, 14, 8).permute(2, 0, 1)
    half = clip.resize_pos_embed(pos, (7, 7))
    rows_only = clip.resize_pos_embed(pos, (7, 14))
    assert torch.equal(half[0], pos[0]) and torch.equal(rows_only[0], pos[0])
    torch.testing.assert_close(half[1:], F.avg_pool2d(grid, 2).permute(1, 2, 0).reshape(49, 8))
    torch.testing.assert_close(rows_only[1:], F.avg_pool2d(grid, (2, 1)).permute(1, 2, 0).reshape(98, 8))


def test_build_model_resizes_and_keeps_the_rest(tiny_vit):
    sd = tiny_vit.state_dict()
    same = clip.build_model(sd, 14, 14, 16)
    reid = clip.build_model(sd, 21, 10, 12)
    assert torch.equal(same.visual.positional_embedding, sd["visual.positional_embedding"])
    torch.testing.assert_close(reid.visual.positional_embedding,
                               clip.resize_pos_embed(sd["visual.positional_embedding"], (21, 10)))
    for k, v in reid.state_dict().items():
        if k != "visual.positional_embedding":
            assert torch.equal(v, sd[k]), k


def test_sie_enters_only_through_the_class_token():
    model = _tiny(h=21, w=10, stride=12)
    x = torch.randn(1, 3, 256, 128)
    cv = torch.randn(1, 64)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.visual.class_embedding.add_(cv[0])
        plain = model.visual(x)
        zero = model.visual(x, torch.zeros(1, 64))
        with_cv = model.visual(x, cv)
        reference = shifted.visual(x)
    for a, b, c, d in zip(plain, zero, with_cv, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, d)
        assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------- loading
def _weights_equal(model: clip.CLIP, sd: dict, atol: float = 0.0) -> None:
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=atol, msg=k)


def test_load_clip_plain_open_clip_and_named(tiny_vit, tmp_path, monkeypatch):
    sd = tiny_vit.state_dict()
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    _weights_equal(clip.load_clip(str(plain), 14, 14, 16), sd)

    ckpt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)
    _weights_equal(clip.load_clip(ckpt, 14, 14, 16), sd)

    monkeypatch.setattr(loader, "CLIP_CACHE_DIR", tmp_path)
    torch.save(dict(sd, logit_scale=torch.tensor(4.6)), tmp_path / "ViT-B-16.pt")
    sha = download.sha256_of(tmp_path / "ViT-B-16.pt")     # a cached file with the URL's checksum is used as is
    monkeypatch.setitem(download.OPENAI_URLS, "ViT-B-16", f"http://127.0.0.1:9/{sha}/ViT-B-16.pt")
    _weights_equal(clip.load_clip("ViT-B-16", 14, 14, 16), sd)


def test_load_clip_torchscript_archive(tiny_vit, tmp_path):
    """An OpenAI-style TorchScript archive (fp16 weights, extra scalar entries)."""
    holder = copy.deepcopy(tiny_vit)
    del holder.context_length
    for key in ("input_resolution", "context_length", "vocab_size"):
        holder.register_buffer(key, torch.tensor(224))
    tokens = clip.tokenize(["a photo"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive = torch.jit.trace_module(
            holder, {"encode_text": tokens, "encode_image": torch.randn(1, 3, 224, 224)}, check_trace=False)
    archive.half()
    path = tmp_path / "ViT-tiny.pt"
    archive.save(str(path))
    sd = tiny_vit.state_dict()
    _weights_equal(clip.load_clip(path, 14, 14, 16), {k: v.half() for k, v in sd.items()})


def test_load_clip_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "CLIP_CACHE_DIR", tmp_path)
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    with pytest.raises(FileNotFoundError, match="MODEL.PRETRAIN_PATH") as err:
        clip.load_clip("ViT-B-16", 21, 10, 12)
    assert str(tmp_path / "ViT-B-16.pt") in str(err.value) and download.OPENAI_URLS["ViT-B-16"] in str(err.value)
    with pytest.raises(FileNotFoundError, match="MODEL.PRETRAIN_PATH"):
        clip.load_clip(tmp_path / "nowhere.pth", 21, 10, 12)


def test_mismatched_state_dict_lists_bad_keys(tiny_vit):
    sd = dict(tiny_vit.state_dict())
    sd.pop("visual.ln_post.bias")
    sd["visual.extra.weight"] = torch.zeros(3)
    sd["transformer.resblocks.0.mlp.c_fc.bias"] = torch.zeros(7)
    sd.update(logit_scale=torch.tensor(1.0), input_resolution=torch.tensor(224), attn_mask=torch.zeros(77, 77))
    with pytest.raises(ValueError) as err:
        clip.build_model(sd, 14, 14, 16)
    msg = str(err.value)
    for key in ("visual.ln_post.bias", "visual.extra.weight", "transformer.resblocks.0.mlp.c_fc.bias"):
        assert key in msg
    for harmless in ("logit_scale", "input_resolution", "attn_mask"):
        assert harmless not in msg
    with pytest.raises(ValueError, match="not an OpenAI-format CLIP"):
        clip.build_model({"foo": torch.zeros(1)}, 14, 14, 16)


# ------------------------------------------------------------------------------- other checkpoint formats
def _small_open_clip(custom_text: bool, resnet: bool = False) -> nn.Module:
    """A small open_clip model, random init (perturbed), in its own CLIP or CustomTextCLIP class."""
    vision = dict(layers=(1, 1, 1, 1), width=32, head_width=64, image_size=64) if resnet else \
        dict(layers=2, width=64, head_width=64, patch_size=16, image_size=224)
    text = dict(width=64, heads=1, layers=2, context_length=77, vocab_size=49408)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return _perturb(cls(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=True))


def _same_outputs(ours: clip.CLIP, ref: nn.Module) -> None:
    """Our text features and projected class token equal the reference model's encode_text / encode_image."""
    tokens, x = clip.tokenize(TEXTS), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens))
        _assert_close(ours.visual(x)[2][:, 0], ref.encode_image(x))


@pytest.mark.parametrize("custom_text", [False, True], ids=["CLIP", "CustomTextCLIP"])
def test_open_clip_checkpoints_load_as_open_clip_computes(custom_text, tmp_path):
    """open_clip's own state dicts (plain, its training checkpoint with DDP prefixes, torch.compile's
    prefix, safetensors) load and compute what open_clip computes; CustomTextCLIP keeps its text tower
    under 'text.'."""
    from safetensors.torch import save_file
    torch.manual_seed(3)
    ref = _small_open_clip(custom_text)
    sd = ref.state_dict()
    assert any(k.startswith("text.") for k in sd) is custom_text
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "epoch_2.pt")
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "compiled.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "open_clip_model.safetensors"))
    for name in ("plain.pt", "epoch_2.pt", "compiled.pt", "open_clip_model.safetensors"):
        _same_outputs(clip.load_clip(tmp_path / name, 14, 14, 16), ref)


def test_open_clip_resnet_custom_text_maps_every_tensor(tmp_path):
    torch.manual_seed(4)
    ref = _small_open_clip(custom_text=True, resnet=True)
    torch.save(ref.state_dict(), tmp_path / "rn.pt")
    ours = clip.load_clip(tmp_path / "rn.pt", 2, 2, 16)     # 64 px: the 2x2 grid of the pretrained size
    expected = {k.removeprefix("text."): v for k, v in ref.state_dict().items() if k != "logit_scale"}
    got = ours.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    tokens = clip.tokenize(TEXTS)
    with torch.no_grad():
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens))


def _to_hugging_face(sd: dict) -> dict:
    """Our (OpenAI) names -> transformers' CLIPModel names: what a CLIPModel.state_dict() holds."""
    top = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
           "visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
           "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
           "visual.ln_post.weight": "vision_model.post_layernorm.weight",
           "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
    block = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    hf = {"logit_scale": torch.tensor(4.6052),
          "text_model.embeddings.position_ids": torch.arange(77)[None],
          "vision_model.embeddings.position_ids": torch.arange(197)[None]}
    for k, v in sd.items():
        if k in top:
            hf[top[k]] = v
        elif k in ("text_projection", "visual.proj"):
            hf["text_projection.weight" if k == "text_projection" else "visual_projection.weight"] = v.t().clone()
        else:
            tower, i, rest = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", k).groups()
            base = f"{'vision' if tower else 'text'}_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for letter, part in zip("qkv", v.chunk(3)):
                    hf[f"{base}self_attn.{letter}_proj.{kind}"] = part.clone()
            else:
                module, param = rest.rsplit(".", 1)
                hf[f"{base}{block[module]}.{param}"] = v
    return hf


def test_hugging_face_checkpoint_round_trip(tmp_path):
    """A transformers CLIPModel state dict (.bin and .safetensors) gives back every tensor of the model
    it was made from, and the same numbers (heads: one per 64 channels, as a checkpoint implies)."""
    from safetensors.torch import save_file
    torch.manual_seed(5)
    tiny_vit = _tiny(text_heads=1)
    sd = tiny_vit.state_dict()
    hf = _to_hugging_face(sd)
    # towers x layers x (q, k, v, out) x (weight, bias)
    assert len([k for k in hf if "_proj." in k and "self_attn" in k]) == 2 * 2 * 4 * 2
    torch.save(hf, tmp_path / "pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    tokens, x = clip.tokenize(TEXTS), torch.randn(2, 3, 224, 224)
    for name in ("pytorch_model.bin", "model.safetensors"):
        ours = clip.load_clip(tmp_path / name, 14, 14, 16)
        _weights_equal(ours, sd)
        with torch.no_grad():
            torch.testing.assert_close(ours.encode_text(tokens), tiny_vit.encode_text(tokens), rtol=0, atol=0)
            torch.testing.assert_close(ours.encode_image(x), tiny_vit.encode_image(x), rtol=0, atol=0)


def test_foreign_checkpoints_are_refused_in_one_line(tiny_vit, tmp_path):
    """A file that is no CLIP checkpoint is one UserError line naming what it holds."""
    from utils.errors import UserError
    timm_vit = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
                "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}
    torch.save(timm_vit, tmp_path / "timm.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    (tmp_path / "notes.txt").write_text("not weights\n" * 10)
    sd = dict(tiny_vit.state_dict())
    sd.pop("visual.ln_post.bias")
    torch.save(sd, tmp_path / "incomplete.pt")
    expected = {"timm.pth": ["cls_token", "pos_embed", "patch_embed.proj.weight", "3 entries"],
                "module.pth": ["pickled Python objects"], "list.pth": ["holds a list"],
                "notes.txt": ["cannot be read"], "incomplete.pt": ["missing keys (1)", "visual.ln_post.bias"]}
    for name, words in expected.items():
        with pytest.raises(UserError) as err:
            clip.load_clip(tmp_path / name, 14, 14, 16)
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path / name) in msg, msg
        for word in words:
            assert word in msg, (word, msg)


# ------------------------------------------------------------------------------- misc
@pytest.mark.slow
def test_build_random_clip_arch_overrides(vit_pair):
    ref, _ = vit_pair
    full = clip.build_random_clip("ViT-B-16", 14, 14, 16)
    assert full.arch == clip.ARCHITECTURES["ViT-B-16"]
    expected = {k: v.shape for k, v in ref.state_dict().items() if k != "logit_scale"}
    assert {k: v.shape for k, v in full.state_dict().items()} == expected
    # OpenAI's init scales, e.g. text projection ~ N(0, width^-1/2), zero attention biases
    assert abs(full.text_projection.std().item() - 512 ** -0.5) < 2e-3
    assert not full.visual.transformer.resblocks[0].attn.in_proj_bias.any()
    tiny = _tiny(h=21, w=10, stride=12, text_heads=0)
    assert tiny.transformer.resblocks[0].attn.heads == 1
    assert tiny.token_embedding.num_embeddings == 49408 and tiny.positional_embedding.shape == (77, 64)
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        clip.build_random_clip("ViT-L-14", 14, 14, 16)


def test_encode_image_is_projected_class_token(tiny_vit):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit.encode_image(x), tiny_vit.visual(x)[2][:, 0], rtol=0, atol=0)


def test_convert_weights_fp16(tiny_vit):
    model = copy.deepcopy(tiny_vit)
    x, tokens = torch.randn(2, 3, 224, 224), clip.tokenize(TEXTS[:2])
    with torch.no_grad():
        img32, txt32 = model.encode_image(x), model.encode_text(tokens)
        clip.convert_weights_fp16(model)
        img16, txt16 = model.encode_image(x), model.encode_text(tokens)
    assert model.dtype == torch.float16 and model.visual.ln_pre.weight.dtype == torch.float32
    assert img16.dtype == txt16.dtype == torch.float16
    _assert_close(img16.float(), img32, atol=2e-2)
    _assert_close(txt16.float(), txt32, atol=2e-2)
