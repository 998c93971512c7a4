"""make_dataloader on a tiny synthetic set: shapes, dtypes (uint8 from the loaders, normalised float
after the device transform), SSL views, order, sampling, worker settings."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from config import load_config
from datasets import RandomIdentitySampler, RandomIdentitySamplerDDP, ShuffleSampler, build_dataset, make_dataloader
from processor.batches import device_transform_of, to_device
from tests.helpers import synthetic_set

H, W = 32, 16


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return synthetic_set(tmp_path_factory.mktemp("synthetic"), num_train_ids=6, num_cams=3, query_cams=2,
                         height=H, width=W, seed=1)


def make_cfg(root: str, *opts: str):
    return load_config(None, [
        "DATASETS.NAMES", "folder", "DATASETS.ROOT_DIR", root,
        "INPUT.SIZE_TRAIN", f"[{H},{W}]", "INPUT.SIZE_TEST", f"[{H},{W}]", "INPUT.PADDING", "2",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.NUM_INSTANCE", "2",
        "SOLVER.STAGE2.IMS_PER_BATCH", "8", "SOLVER.STAGE1.IMS_PER_BATCH", "16",
        "TEST.IMS_PER_BATCH", "16", "MODEL.DEVICE", "cpu", *opts])


def test_three_loaders_shapes_and_dtypes(root):
    cfg = make_cfg(root, "MODEL.USE_SSL", "True", "INPUT.RE_PROB", "1.0")
    s2, s1, val, num_query, num_classes, cams, views = make_dataloader(cfg)
    ds = build_dataset("folder", root)
    assert (num_query, num_classes, cams, views) == (len(ds.query), 6, 3, 1)

    raw = next(iter(s2))
    assert set(raw) == {"img", "pid", "camid", "viewid", "ssl_view1", "ssl_view2"}
    for key in ("img", "ssl_view1", "ssl_view2"):
        assert raw[key].shape == (8, 3, H, W) and raw[key].dtype == torch.uint8
    batch = to_device(raw, torch.device("cpu"), device_transform_of(s2))
    for key in ("img", "ssl_view1", "ssl_view2"):
        assert batch[key].shape == (8, 3, H, W) and batch[key].dtype == torch.float32
    for key in ("pid", "camid", "viewid"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (8,)
    assert sorted(torch.bincount(batch["pid"]).tolist())[-4:] == [2, 2, 2, 2]
    # SSL views are independent draws (erased with RE_PROB 1): they differ from the image and from each other
    for i in range(8):
        assert not torch.equal(batch["ssl_view1"][i], batch["img"][i])
        assert not torch.equal(batch["ssl_view1"][i], batch["ssl_view2"][i])
    assert isinstance(s2.sampler, RandomIdentitySampler)
    batches = list(s2)  # the published length is an upper-bound estimate
    assert 1 <= len(batches) <= len(s2) and all(b["img"].shape[0] == 8 for b in batches)

    stage1 = list(s1)
    assert set(stage1[0]) == {"img", "pid", "camid", "viewid"}
    assert stage1[0]["img"].shape[1:] == (3, H, W)
    pids = torch.cat([b["pid"] for b in stage1]).tolist()
    assert pids == [s[1] for s in ds.train]          # every image once, dataset order

    val_batches = list(val)
    assert set(val_batches[0]) == {"img", "pid", "camid", "viewid", "path"}
    paths = sum((b["path"] for b in val_batches), [])
    assert paths == [s[0] for s in ds.query + ds.gallery]  # query first, then gallery
    assert all("/query/" in p for p in paths[:num_query])
    assert all("/bounding_box_test/" in p for p in paths[num_query:])


def test_test_transform_is_deterministic(root):
    cfg = make_cfg(root, "MODEL.USE_SSL", "False")
    _, s1, val, *_ = make_dataloader(cfg)
    a, b = next(iter(val)), next(iter(val))
    assert a["img"].dtype == torch.uint8 and torch.equal(a["img"], b["img"])
    a = to_device(a, torch.device("cpu"), device_transform_of(val))
    mean = a["img"].mean().item()
    assert -1.0 <= mean <= 1.0 and a["img"].min() >= -1.0 - 1e-6 and a["img"].max() <= 1.0 + 1e-6


def test_no_ssl_views_without_ssl_and_softmax_shuffle(root):
    cfg = make_cfg(root, "MODEL.USE_SSL", "False", "DATALOADER.SAMPLER", "softmax")
    s2, *_ = make_dataloader(cfg)
    assert isinstance(s2.sampler, ShuffleSampler)
    batches = list(s2)
    assert "ssl_view1" not in batches[0]
    assert all(b["img"].shape[0] == 8 for b in batches)  # no trailing partial batch
    s2.sampler.set_epoch(0)
    order0 = list(s2.sampler)
    s2.sampler.set_epoch(1)
    assert list(s2.sampler) != order0


def test_worker_seeding_reproducible(root):
    cfg = make_cfg(root, "MODEL.USE_SSL", "False", "DATALOADER.NUM_WORKERS", "1",
                   "INPUT.RE_PROB", "1.0")
    first = []
    for _ in range(2):
        s2, *_ = make_dataloader(cfg)
        assert not s2.persistent_workers
        first.append(next(iter(s2))["img"])
        del s2
    assert torch.equal(first[0], first[1])


def test_epoch_batches_depend_on_epoch_only_with_workers(root):
    """What resume needs: epoch e's augmented batch is the same whatever ran before it."""
    from processor.batches import set_loader_epoch
    cfg = make_cfg(root, "DATALOADER.NUM_WORKERS", "1", "INPUT.RE_PROB", "1.0")
    a, *_ = make_dataloader(cfg)
    for epoch in (1, 2):
        set_loader_epoch(a, cfg.SOLVER.SEED, epoch)
        batch_a = next(iter(a))
    b, *_ = make_dataloader(cfg)
    set_loader_epoch(b, cfg.SOLVER.SEED, 2)
    batch_b = next(iter(b))
    set_loader_epoch(b, cfg.SOLVER.SEED, 3)
    batch_c = next(iter(b))
    assert torch.equal(batch_a["img"], batch_b["img"]) and torch.equal(batch_a["ssl_view1"], batch_b["ssl_view1"])
    assert not torch.equal(batch_b["img"], batch_c["img"])


def test_ddp_sampler_under_process_group(root, tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cfg = make_cfg(root, "MODEL.USE_SSL", "False", "MODEL.DIST_TRAIN", "True")
        s2, *_ = make_dataloader(cfg)
        assert isinstance(s2.sampler, RandomIdentitySamplerDDP)
        assert s2.batch_size == 8
    finally:
        dist.destroy_process_group()


def test_missing_root_is_clear_error(tmp_path):
    cfg = make_cfg(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="expected layout"):
        make_dataloader(cfg)
    assert not os.path.exists(tmp_path / "nothing")


def test_worker_settings(root, monkeypatch):
    """Workers from the cores when NUM_WORKERS is -1; the training loader is re-seeded per epoch
    (not persistent), the deterministic validation loader keeps its workers; prefetching."""
    from utils import misc
    monkeypatch.setattr(misc, "available_cores", lambda: 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = make_cfg(root, "MODEL.USE_SSL", "False", "DATALOADER.NUM_WORKERS", "-1")
    s2, s1, val, *_ = make_dataloader(cfg)
    assert s2.num_workers == s1.num_workers == val.num_workers == 2        # min(8, 3 - 1)
    assert not s2.persistent_workers and not s1.persistent_workers and val.persistent_workers
    assert s2.prefetch_factor == 4
    assert s2.pin_memory == torch.cuda.is_available()
    monkeypatch.setattr(misc, "available_cores", lambda: 64)
    assert misc.resolve_num_workers(-1) == 8 and misc.resolve_num_workers(-1, 16) == 3
    assert misc.resolve_num_workers(5) == 5
    monkeypatch.setitem(os.environ, "LOCAL_WORLD_SIZE", "32")
    assert misc.resolve_num_workers(-1) == 1


def test_a_worker_count_beyond_the_cores_is_capped_with_one_warning(root, monkeypatch, caplog):
    """DATALOADER.NUM_WORKERS 1000 on 2 cores: 2 workers per loader, and one warning line saying so."""
    from utils import misc
    monkeypatch.setattr(misc, "available_cores", lambda: 2)
    monkeypatch.setattr(misc, "_capped_warned", set())
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = make_cfg(root, "MODEL.USE_SSL", "False", "DATALOADER.NUM_WORKERS", "1000")
    with caplog.at_level("WARNING", logger="svllreid"):
        s2, s1, val, *_ = make_dataloader(cfg)       # three loaders, one warning
    assert s2.num_workers == s1.num_workers == val.num_workers == 2
    warned = [r.getMessage() for r in caplog.records if "NUM_WORKERS" in r.getMessage()]
    assert len(warned) == 1 and "1000" in warned[0] and "2 loader workers" in warned[0], warned
    assert "\n" not in warned[0]
    assert misc.resolve_num_workers(2) == 2 and misc.resolve_num_workers(0) == 0     # within the cores: kept
    monkeypatch.setitem(os.environ, "LOCAL_WORLD_SIZE", "2")                          # 2 processes: 1 core each
    assert misc.resolve_num_workers(1000) == 1
