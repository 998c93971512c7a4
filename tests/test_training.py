"""End-to-end training on a tiny synthetic set: what each stage changes, exact resume,
the test script reproducing the trained mAP, and clear failures for bad input."""
import json
import os

import pytest
import torch

import processor.processor_stage1 as stage1_mod
import processor.processor_stage2 as stage2_mod
import test_svllreid
import train_svllreid
from config import load_config
from datasets import make_dataloader
from model import make_model
from processor import do_train_stage1, do_train_stage2
from solver import create_scheduler, create_warmup_multistep, make_optimizer_1stage, make_optimizer_2stage
from loss import make_loss, make_ssl_loss
from utils.checkpoint import CheckpointMismatchError, load_model_weights
from utils.misc import set_seed

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/demo/vit_svllreid_demo.yml")


def tiny_cfg(root, out, *opts):
    return load_config(DEMO, [
        "DATASETS.ROOT_DIR", root, "OUTPUT_DIR", str(out), "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.STAGE1.MAX_EPOCHS", "2", "SOLVER.STAGE1.IMS_PER_BATCH", "12",
        "SOLVER.STAGE2.MAX_EPOCHS", "2", "SOLVER.STAGE2.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2",
        "SOLVER.STAGE2.EVAL_PERIOD", "2", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "2",
        "SOLVER.STAGE1.CHECKPOINT_PERIOD", "2", "SOLVER.STAGE2.STEPS", "[1, 2]", "TEST.IMS_PER_BATCH", "16",
        *opts])


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model, prefix):
    now = dict(model.named_parameters())
    return {n for n in before if n.startswith(prefix) and not torch.equal(before[n], now[n])}


def build(cfg):
    set_seed(cfg.SOLVER.SEED)
    loaders = make_dataloader(cfg)
    tl2, tl1, val, nq, ncls, ncam, nview = loaders
    model = make_model(cfg, ncls, ncam, nview)
    return model, loaders


@pytest.mark.parametrize("train_mlp", [False, True])
def test_stage1_changes_only_the_prompt_learner(tiny_root, tmp_path, train_mlp):
    cfg = tiny_cfg(tiny_root, tmp_path, "SOLVER.STAGE1.MAX_EPOCHS", "1", "MODEL.TRAIN_TEXT_MLP_STAGE1", str(train_mlp))
    model, (_, tl1, _, _, _, _, _) = build(cfg)
    before = snapshot(model)
    model.set_stage(1, train_text_mlp=train_mlp)
    opt = make_optimizer_1stage(cfg, model)
    do_train_stage1(cfg, model, tl1, opt, create_scheduler(cfg.SOLVER.STAGE1, opt), torch.device("cpu"))
    all_changed = changed(before, model, "")
    assert "prompt_learner.cls_ctx" in all_changed
    expected = {"prompt_learner.cls_ctx"} | ({n for n in before if n.startswith("text_mlp")} if train_mlp else set())
    assert all_changed == expected


def test_stage2_freezes_text_side_and_trains_image_encoder(tiny_root, tmp_path):
    cfg = tiny_cfg(tiny_root, tmp_path, "SOLVER.STAGE2.MAX_EPOCHS", "1")
    model, (tl2, _, val, nq, ncls, _, _) = build(cfg)
    before = snapshot(model)
    model.set_stage(2)
    loss_fn, center = make_loss(cfg, ncls, feat_dim=model.feature_dims[0])
    opt, opt_c = make_optimizer_2stage(cfg, model, center)
    do_train_stage2(cfg, model, tl2, None, opt, opt_c, create_warmup_multistep(cfg.SOLVER.STAGE2, opt), loss_fn,
                    make_ssl_loss(cfg), center, nq, ncls, torch.device("cpu"))
    assert not changed(before, model, "text_encoder") and not changed(before, model, "prompt_learner")
    assert changed(before, model, "image_encoder.transformer")
    assert changed(before, model, "image_mlp") and changed(before, model, "classifier")


class Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, module, stage, epoch):
    """Make the first save of ``last.pth`` at (stage, epoch) kill the run right after writing it."""
    original = module.save_train_state

    def save_then_die(output_dir, st, ep, *args, **kwargs):
        original(output_dir, st, ep, *args, **kwargs)
        if (st, ep) == (stage, epoch):
            raise Interrupt()

    monkeypatch.setattr(module, "save_train_state", save_then_die)


def _final_weights(out):
    return torch.load(os.path.join(out, "ViT-B-16_2.pth"), weights_only=True)


@pytest.fixture(scope="module")
def straight_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    cfg = tiny_cfg(tiny_root, out)
    result = train_svllreid.train(cfg)
    return cfg, out, result


@pytest.mark.parametrize("stage,module", [(1, stage1_mod), (2, stage2_mod)])
def test_resume_is_exact(tiny_root, tmp_path, monkeypatch, straight_run, stage, module):
    """Straight 2+2 epochs == interrupted after epoch 1 of ``stage`` + --resume."""
    cfg = tiny_cfg(tiny_root, tmp_path)
    with monkeypatch.context() as m:
        _interrupt_after(m, module, stage, 1)
        with pytest.raises(Interrupt):
            train_svllreid.train(cfg)
    resumed = train_svllreid.train(cfg, resume=True)
    a, b = _final_weights(straight_run[1]), _final_weights(tmp_path)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    assert resumed["trained"]["mAP"] == straight_run[2]["trained"]["mAP"]


def test_test_script_reproduces_trained_map(straight_run):
    cfg, out, result = straight_run
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["mAP"] == result["trained"]["mAP"] and len(saved["cmc"]) == 50
    weight = os.path.join(out, "ViT-B-16_2.pth")
    code = test_svllreid.main(["--config_file", DEMO, *_opts_of(cfg), "TEST.WEIGHT", weight,
                               "OUTPUT_DIR", str(out / "eval")])
    assert code == 0
    with open(os.path.join(out, "eval", "results.json")) as f:
        evaluated = json.load(f)
    assert evaluated["mAP"] == pytest.approx(saved["mAP"], abs=1e-7)
    assert evaluated["cmc"] == pytest.approx(saved["cmc"], abs=1e-7)


def _opts_of(cfg):
    keys = ["DATASETS.ROOT_DIR", "INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST", "DATALOADER.NUM_WORKERS",
            "DATALOADER.NUM_INSTANCE", "SOLVER.STAGE2.IMS_PER_BATCH"]
    opts = []
    for k in keys:
        node = cfg
        for part in k.split("."):
            node = node[part]
        opts += [k, str(list(node)) if isinstance(node, (list, tuple)) else str(node)]
    return opts


def test_mismatched_checkpoint_lists_keys(straight_run, tiny_root, tmp_path, capsys):
    cfg, out, _ = straight_run
    weight = os.path.join(out, "ViT-B-16_2.pth")
    other = make_model(tiny_cfg(tiny_root, tmp_path), num_class=5, camera_num=2, view_num=1)
    with pytest.raises(CheckpointMismatchError) as e:
        load_model_weights(other, weight)
    msg = str(e.value)
    assert "mis-shaped" in msg and "classifier.weight" in msg and "prompt_learner.cls_ctx" in msg
    rn = make_model(tiny_cfg(tiny_root, tmp_path, "MODEL.NAME", "RN50", "MODEL.SIE_CAMERA", "False",
                             "MODEL.CLIP_ARCH.VISION_WIDTH", "16", "MODEL.CLIP_ARCH.VISION_LAYERS", "1",
                             "MODEL.STRIDE_SIZE", "[16, 16]"), 8, 2, 1)
    with pytest.raises(CheckpointMismatchError, match="missing keys .*unexpected keys"):
        load_model_weights(rn, weight)
    # through the CLI: a retrieval-path key missing or mis-shaped gives exit code 2 and one line naming it
    sd = torch.load(weight, weights_only=True)
    del sd["image_encoder.ln_post.weight"]
    sd["bottleneck.weight"] = sd["bottleneck.weight"][:-1]
    damaged = str(tmp_path / "damaged.pth")
    torch.save(sd, damaged)
    code = test_svllreid.main(["--config_file", DEMO, "DATASETS.ROOT_DIR", tiny_root, "INPUT.SIZE_TRAIN", "[64, 32]",
                               "INPUT.SIZE_TEST", "[64, 32]", "TEST.WEIGHT", damaged, "OUTPUT_DIR", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "image_encoder.ln_post.weight" in err and "bottleneck.weight: checkpoint (63,) vs model (64,)" in err
    # a grid that does not fit the checkpoint names the positional embedding and the keys to fix
    code = test_svllreid.main(["--config_file", DEMO, "DATASETS.ROOT_DIR", tiny_root, "TEST.WEIGHT", weight,
                               "OUTPUT_DIR", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "image_encoder.positional_embedding" in err and "INPUT.SIZE_TRAIN" in err


def test_bad_override_fails_clearly(capsys):
    code = train_svllreid.main(["--config_file", DEMO, "SOLVER.STAGE1.PROMPT_AUG_METHOD", "foo"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "SOLVER.STAGE1.PROMPT_AUG_METHOD" in err and "'mix'" in err


def test_missing_dataset_fails_clearly(tmp_path, capsys):
    code = train_svllreid.main(["--config_file", DEMO, "DATASETS.ROOT_DIR", str(tmp_path / "nope"),
                                "OUTPUT_DIR", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope" in err and "bounding_box_train" in err


def _fake_vehicleid(root, train_ids=6, test_ids=4, per_id=3):
    """A VehicleID_V1.0 tree with tiny colour-coded JPEGs (one colour family per identity)."""
    from PIL import Image
    base = os.path.join(root, "VehicleID_V1.0")
    os.makedirs(os.path.join(base, "image"))
    os.makedirs(os.path.join(base, "train_test_split"))
    g = torch.Generator().manual_seed(0)
    lines = {"train_list.txt": [], "test_list_800.txt": []}
    splits = (("train_list.txt", range(100, 100 + train_ids)), ("test_list_800.txt", range(500, 500 + test_ids)))
    for split, pids in splits:
        for pid in pids:
            colour = torch.rand(3, generator=g)
            for k in range(per_id):
                name = f"{pid:07d}{k}"
                arr = (colour.view(1, 1, 3) * 40 + 200 * torch.rand(64, 32, 3, generator=g)).clamp(0, 255)
                Image.fromarray(arr.to(torch.uint8).numpy()).save(os.path.join(base, "image", name + ".jpg"))
                lines[split].append(f"{name} {pid}")
    for split, ls in lines.items():
        with open(os.path.join(base, "train_test_split", split), "w") as f:
            f.write("\n".join(ls) + "\n")


def test_vehicleid_test_script_averages_trials(tmp_path):
    """VehicleID: evaluation over random query/gallery trials, averaged (published code crashed here)."""
    _fake_vehicleid(str(tmp_path / "data"))
    opts = ["DATASETS.NAMES", "VehicleID", "DATASETS.ROOT_DIR", str(tmp_path / "data"), "INPUT.SIZE_TRAIN", "[64, 32]",
            "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0", "MODEL.SIE_CAMERA", "False",
            "DATASETS.VEHICLEID_TRIALS", "3", "OUTPUT_DIR", str(tmp_path / "out")]
    cfg = load_config(DEMO, opts)
    torch.manual_seed(0)
    model = make_model(cfg, num_class=6, camera_num=2, view_num=1)
    assert model.prompt_learner.template.endswith("vehicle.")
    weight = str(tmp_path / "w.pth")
    torch.save(model.state_dict(), weight)
    assert test_svllreid.main(["--config_file", DEMO, *opts, "TEST.WEIGHT", weight]) == 0
    with open(tmp_path / "out" / "results.json") as f:
        res = json.load(f)
    trials = res["trials"]
    assert len(trials) == 3 and all(t["num_gallery"] == 4 and t["num_query"] == 8 for t in trials)
    assert res["mAP"] == pytest.approx(sum(t["mAP"] for t in trials) / 3)
    assert res["cmc"][0] == pytest.approx(sum(t["cmc"][0] for t in trials) / 3)
    assert len({round(t["mAP"], 9) for t in trials}) > 1      # the random splits differ


def test_stage2_with_center_loss_trains_the_centers(tiny_root, tmp_path):
    """METRIC_LOSS_TYPE triplet_center: own SGD optimiser, gradient rescaled by 1/CENTER_LOSS_WEIGHT."""
    cfg = tiny_cfg(tiny_root, tmp_path, "SOLVER.STAGE2.MAX_EPOCHS", "1", "MODEL.METRIC_LOSS_TYPE", "triplet_center")
    model, (tl2, _, _, nq, ncls, _, _) = build(cfg)
    model.set_stage(2)
    loss_fn, center = make_loss(cfg, ncls, feat_dim=model.feature_dims[0])
    opt, opt_c = make_optimizer_2stage(cfg, model, center)
    assert opt_c is not None
    before = center.centers.detach().clone()
    seen = []
    original_step = opt_c.step

    def step_and_record(*a, **k):
        seen.append(center.centers.grad.abs().max().item())
        return original_step(*a, **k)

    opt_c.step = step_and_record
    do_train_stage2(cfg, model, tl2, None, opt, opt_c, create_warmup_multistep(cfg.SOLVER.STAGE2, opt), loss_fn,
                    make_ssl_loss(cfg), center, nq, ncls, torch.device("cpu"))
    assert seen and all(g > 0 for g in seen)           # one step per batch, with a real gradient
    assert not torch.equal(before, center.centers.detach())


def test_resume_flag_accepted_before_or_after_overrides():
    for argv in (["--config_file", DEMO, "--resume", "OUTPUT_DIR", "x"],
                 ["--config_file", DEMO, "OUTPUT_DIR", "x", "--resume"]):
        args = train_svllreid.parse_args(argv)
        assert args.resume and args.opts == ["OUTPUT_DIR", "x"]
    assert not train_svllreid.parse_args(["--config_file", DEMO, "OUTPUT_DIR", "x"]).resume
