"""Dataset parsers on fake trees in the exact published layouts."""
from __future__ import annotations

import io
import logging
import os
import time

import pytest
from PIL import Image

from datasets import DatasetError, DatasetLayoutError, ImageDataset, build_dataset, read_image
from datasets.vehicleid import VehicleID


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 8), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def write_images(folder: str, names: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for n in names:
        path = os.path.join(folder, n)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(JPEG)


# ------------------------------------------------------------------ Market-style trees
MARKET_TRAIN = [  # (pid, camera) in file-name order
    (2, 1), (2, 3), (7, 2), (7, 2), (7, 6), (15, 4), (15, 5), (1500, 1), (1500, 2),
]
MARKET_QUERY = [(20, 1), (33, 2), (33, 5)]
MARKET_GALLERY = [(20, 2), (20, 1), (33, 3), (0, 4), (0, 6), (-1, 1), (-1, 3)]


def market_names(items: list[tuple[int, int]]) -> list[str]:
    return [f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg" if pid >= 0 else f"-1_c{cam}s1_{i:06d}_00.jpg"
            for i, (pid, cam) in enumerate(items)]


def make_market_tree(base: str, duke_names: bool = False) -> None:
    def names(items):
        if duke_names:
            return [f"{pid:04d}_c{cam}_f{i:07d}.jpg" if pid >= 0 else f"-1_c{cam}_f{i:07d}.jpg"
                    for i, (pid, cam) in enumerate(items)]
        return market_names(items)
    write_images(os.path.join(base, "bounding_box_train"), names(MARKET_TRAIN))
    write_images(os.path.join(base, "query"), names(MARKET_QUERY))
    write_images(os.path.join(base, "bounding_box_test"), names(MARKET_GALLERY))


def check_market_like(ds) -> None:
    # train: sorted file order kept, pids relabelled 2,7,15,1500 -> 0..3 (sorted, bijective)
    assert [s[1] for s in ds.train] == [0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert [s[2] for s in ds.train] == [c - 1 for _, c in MARKET_TRAIN]
    assert ds.num_train_pids == 4 and ds.num_train_imgs == 9 and ds.num_train_cams == 6
    assert ds.num_train_vids == 1 and all(s[3] == 0 for s in ds.train)
    # query/gallery keep original pids; junk (-1) skipped, distractors (0) kept
    # (files are listed in sorted name order)
    assert [(s[1], s[2]) for s in ds.query] == [(20, 0), (33, 1), (33, 4)]
    assert [(s[1], s[2]) for s in ds.gallery] == [(0, 3), (0, 5), (20, 0), (20, 1), (33, 2)]
    assert sum(s[1] == 0 for s in ds.gallery) == 2
    assert ds.num_query_imgs == 3 and ds.num_gallery_imgs == 5
    assert all(os.path.isfile(s[0]) for s in ds.train + ds.query + ds.gallery)


@pytest.mark.parametrize("name, subdir, duke", [
    ("market1501", "Market-1501-v15.09.15", False),
    ("dukemtmc", "dukemtmcreid/DukeMTMC-reID", True),
    ("occ_duke", "dukemtmcreid/Occluded_Duke", True),
])
def test_market_style_datasets(tmp_path, caplog, name, subdir, duke):
    make_market_tree(str(tmp_path / subdir), duke_names=duke)
    with caplog.at_level(logging.INFO, logger="svllreid"):
        ds = build_dataset(name, str(tmp_path))
    check_market_like(ds)
    table = caplog.text
    assert "# ids" in table and "# images" in table and "# cameras" in table
    assert "train    |     4 |        9 |         6" in table


def test_root_may_be_the_dataset_folder(tmp_path):
    make_market_tree(str(tmp_path / "Market-1501-v15.09.15"))
    ds = build_dataset("market1501", str(tmp_path / "Market-1501-v15.09.15"))
    assert ds.num_train_pids == 4


def test_relabel_is_stable_when_files_interleave(tmp_path):
    base = tmp_path / "Market-1501-v15.09.15"
    make_market_tree(str(base))
    # a pid whose images are not contiguous in name order (frame numbers interleave)
    write_images(str(base / "bounding_box_train"), ["0009_c1s1_000000_00.jpg"])
    ds = build_dataset("market1501", str(tmp_path))
    labels = {os.path.basename(p): pid for p, pid, _, _ in ds.train}
    assert labels["0009_c1s1_000000_00.jpg"] == 2  # 2,7,9,15,1500 -> 9 is third
    assert sorted(set(labels.values())) == list(range(5))


def test_missing_dataset_folder_lists_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset("market1501", str(tmp_path))
    msg = str(e.value)
    assert "expected layout" in msg and "\n" not in msg   # one line
    for sub in ("bounding_box_train", "query", "bounding_box_test", "Market-1501-v15.09.15"):
        assert sub in msg


def test_partially_missing_layout_names_missing_folder(tmp_path):
    base = tmp_path / "dukemtmcreid" / "DukeMTMC-reID"
    write_images(str(base / "bounding_box_train"), ["0001_c1_f0000001.jpg"])
    with pytest.raises(DatasetLayoutError, match="query"):
        build_dataset("dukemtmc", str(tmp_path))


def test_malformed_names_are_reported_and_skipped(tmp_path, caplog):
    base = tmp_path / "Market-1501-v15.09.15"
    make_market_tree(str(base))
    write_images(str(base / "bounding_box_train"), ["foo.jpg", "12x_c1s1.jpg", "0003_c0s1_0_00.jpg"])
    with caplog.at_level(logging.WARNING, logger="svllreid"):
        ds = build_dataset("market1501", str(tmp_path))
    assert ds.num_train_imgs == 9
    assert "3 file names do not match" in caplog.text and "'12x_c1s1.jpg'" in caplog.text


def test_nothing_parseable_is_an_error(tmp_path):
    base = tmp_path / "Market-1501-v15.09.15"
    make_market_tree(str(base))
    for f in os.listdir(base / "query"):
        os.remove(base / "query" / f)
    write_images(str(base / "query"), ["person1.jpg", "person2.jpg"])
    with pytest.raises(ValueError, match="2 file names .*nothing could be parsed"):
        build_dataset("market1501", str(tmp_path))


def test_folder_dataset_dense_cameras(tmp_path):
    write_images(str(tmp_path / "bounding_box_train"),
                 ["0005_c0_a.jpg", "0005_c3_b.png", "0009_c7_c.jpg"])
    write_images(str(tmp_path / "query"), ["0011_c3_a.jpg"])
    write_images(str(tmp_path / "bounding_box_test"), ["0011_c0_b.jpg", "-1_c3_c.jpg"])
    ds = build_dataset("folder", str(tmp_path))
    assert [s[1:3] for s in ds.train] == [(0, 0), (0, 1), (1, 2)]
    assert [s[1:3] for s in ds.query] == [(11, 1)]
    assert [s[1:3] for s in ds.gallery] == [(11, 0)]
    assert ds.num_train_cams == 3


def test_unknown_dataset_name():
    with pytest.raises(KeyError, match="market1501"):
        build_dataset("market", "/nonexistent")


# ---------------------------------------------------------------------------- MSMT17
def make_msmt_tree(base: str) -> None:
    def entries(specs):  # (pid, cam, k) -> relpath
        return [(f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg", pid)
                for pid, cam, k in specs]
    lists = {
        ("train", "list_train.txt"): entries([(0, 1, 0), (0, 15, 1), (4, 3, 0), (9, 7, 0)]),
        ("train", "list_val.txt"): entries([(4, 2, 5), (9, 7, 6)]),
        ("test", "list_query.txt"): entries([(1, 4, 0), (2, 12, 0)]),
        ("test", "list_gallery.txt"): entries([(1, 5, 1), (2, 13, 1), (2, 12, 2)]),
    }
    for (sub, lname), items in lists.items():
        write_images(os.path.join(base, sub), [p for p, _ in items])
        with open(os.path.join(base, lname), "w") as f:
            f.writelines(f"{p} {pid}\n" for p, pid in items)


def test_msmt17_lists_train_plus_val_and_cameras(tmp_path):
    make_msmt_tree(str(tmp_path / "MSMT17"))
    ds = build_dataset("msmt17", str(tmp_path))
    assert [s[1:3] for s in ds.train] == [(0, 0), (0, 14), (1, 2), (2, 6), (1, 1), (2, 6)]
    assert ds.num_train_pids == 3 and ds.num_train_imgs == 6
    assert all(s[0].startswith(str(tmp_path / "MSMT17" / "train")) for s in ds.train)
    assert [s[1:3] for s in ds.query] == [(1, 3), (2, 11)]
    assert [s[1:3] for s in ds.gallery] == [(1, 4), (2, 12), (2, 11)]
    assert all(s[0].startswith(str(tmp_path / "MSMT17" / "test")) for s in ds.gallery)


def test_msmt17_missing_list_and_bad_lines(tmp_path, caplog):
    base = tmp_path / "MSMT17"
    make_msmt_tree(str(base))
    with open(base / "list_val.txt", "a") as f:
        f.write("garbage-line\n0000/badname.jpg 3\n")
    with caplog.at_level(logging.WARNING, logger="svllreid"):
        ds = build_dataset("msmt17", str(tmp_path))
    assert ds.num_train_imgs == 6 and "2 lines do not match" in caplog.text
    os.remove(base / "list_gallery.txt")
    with pytest.raises(DatasetLayoutError, match="list_gallery.txt"):
        build_dataset("msmt17", str(tmp_path))


# ----------------------------------------------------------------------------- VeRi
VERI = {
    "image_train": [(1, 1, 2), (1, 20, 5), (3, 7, 0), (776, 2, 7)],   # (vid, cam, view)
    "image_query": [(2, 3, 1)],
    "image_test": [(2, 3, 1), (2, 9, 4), (0, 1, 3), (-1, 4, 6)],
}


def make_veri_tree(base: str, keypoints: bool = True) -> None:
    kp: dict[str, list[str]] = {"train": [], "test": []}
    for sub, items in VERI.items():
        names = [(f"{v:04d}" if v >= 0 else "-1") + f"_c{c:03d}_{i:08d}_0.jpg"
                 for i, (v, c, _) in enumerate(items)]
        write_images(os.path.join(base, sub), names)
        split = "train" if sub == "image_train" else "test"
        for n, (_, _, view) in zip(names, items):
            coords = " ".join(str(i) for i in range(40))
            kp[split].append(f"VeRi/{sub}/{n} {coords} {view}\n")
    if keypoints:
        for split, lines in kp.items():
            with open(os.path.join(base, f"keypoint_{split}.txt"), "w") as f:
                f.writelines(lines)


def test_veri_views_from_keypoints(tmp_path):
    make_veri_tree(str(tmp_path / "VeRi"))
    ds = build_dataset("veri", str(tmp_path), need_views=True)
    assert [s[1:] for s in ds.train] == [(0, 0, 2), (0, 19, 5), (1, 6, 0), (2, 1, 7)]
    assert [s[1:] for s in ds.query] == [(2, 2, 1)]
    assert [s[1:] for s in ds.gallery] == [(0, 0, 3), (2, 2, 1), (2, 8, 4)]  # junk skipped
    assert ds.num_train_cams == 20 and ds.num_train_vids == 8


def test_veri_without_keypoints_warns_or_errors(tmp_path, caplog):
    make_veri_tree(str(tmp_path / "VeRi"), keypoints=False)
    with caplog.at_level(logging.WARNING, logger="svllreid"):
        ds = build_dataset("veri", str(tmp_path))
    assert all(s[3] == 0 for s in ds.train + ds.query + ds.gallery)
    assert "no view label" in caplog.text
    with pytest.raises(DatasetLayoutError, match="keypoint_train.txt"):
        build_dataset("veri", str(tmp_path), need_views=True)


# ------------------------------------------------------------------------- VehicleID
def make_vehicleid_tree(base: str, n_test_ids: int = 20) -> dict[int, list[str]]:
    train = [(f"{i:07d}", pid) for i, pid in enumerate([5, 5, 9, 12, 12, 12, 40])]
    test, k = [], 100
    for pid in range(1000, 1000 + n_test_ids):
        for _ in range(1 + pid % 4 + 2):
            test.append((f"{k:07d}", pid))
            k += 1
    write_images(os.path.join(base, "image"), [f"{n}.jpg" for n, _ in train + test])
    os.makedirs(os.path.join(base, "train_test_split"))
    for fname, items in (("train_list.txt", train), ("test_list_800.txt", test)):
        with open(os.path.join(base, "train_test_split", fname), "w") as f:
            f.writelines(f"{n} {pid}\n" for n, pid in items)
    by_pid: dict[int, list[str]] = {}
    for n, pid in test:
        by_pid.setdefault(pid, []).append(os.path.join(base, "image", f"{n}.jpg"))
    return by_pid


def test_vehicleid_split_rules(tmp_path):
    by_pid = make_vehicleid_tree(str(tmp_path / "VehicleID_V1.0"))
    ds = build_dataset("VehicleID", str(tmp_path), test_size=800, trial=0, seed=3)
    assert [s[1] for s in ds.train] == [0, 0, 1, 2, 2, 2, 3]
    assert all(s[2] == 0 for s in ds.train) and ds.num_train_pids == 4
    assert sorted(s[1] for s in ds.gallery) == sorted(by_pid)  # one gallery image per id
    assert all(s[2] == 1 for s in ds.gallery) and all(s[2] == 0 for s in ds.query)
    for pid, paths in by_pid.items():
        got = {s[0] for s in ds.query + ds.gallery if s[1] == pid}
        assert got == set(paths)
    assert len(ds.query) + len(ds.gallery) == sum(map(len, by_pid.values()))
    assert ds.num_train_cams == 2  # covers the gallery camera too


def test_vehicleid_trials_reproducible_and_distinct(tmp_path):
    make_vehicleid_tree(str(tmp_path / "VehicleID_V1.0"))

    def split(trial, seed=3):
        ds = build_dataset("VehicleID", str(tmp_path), test_size=800, trial=trial, seed=seed)
        return tuple(s[0] for s in ds.gallery)

    splits = [split(t) for t in range(10)]
    assert len(set(splits)) == 10
    assert split(4) == splits[4]
    assert split(4, seed=4) != splits[4]


def test_vehicleid_missing_test_list(tmp_path):
    make_vehicleid_tree(str(tmp_path / "VehicleID_V1.0"))
    with pytest.raises(DatasetLayoutError, match="test_list_1600.txt"):
        VehicleID(str(tmp_path), test_size=1600)


# ------------------------------------------------------------------------ image reading
def test_corrupt_image_raises_naming_path_quickly(tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="0001_c1s1_000001_00.jpg"):
        read_image(str(bad), retries=3)
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(OSError, match="missing.jpg"):
        ImageDataset([(str(tmp_path / "missing.jpg"), 1, 0, 0)], read_retries=1)[0]


def test_truncated_image_raises(tmp_path):
    path = tmp_path / "trunc.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[:200])
    with pytest.raises(OSError, match="trunc.jpg"):
        read_image(str(path), retries=0)


def test_read_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (4, 8), 128).save(path)
    img = read_image(str(path))
    assert img.mode == "RGB" and img.size == (4, 8)


# ------------------------------------------------------------------------ test-only (evaluation)
@pytest.mark.parametrize("name, subdir, drop", [
    ("market1501", "Market-1501-v15.09.15", ["bounding_box_train"]),
    ("msmt17", "MSMT17", ["train", "list_train.txt", "list_val.txt"]),
    ("veri", "VeRi", ["image_train", "keypoint_train.txt"]),
    ("VehicleID", "VehicleID_V1.0", ["train_test_split/train_list.txt"]),
])
def test_test_only_needs_no_training_split(tmp_path, name, subdir, drop):
    """Evaluation reads query and gallery only: the same query/gallery as with the full set."""
    import shutil
    base = tmp_path / subdir
    {"market1501": make_market_tree, "msmt17": make_msmt_tree, "veri": make_veri_tree,
     "VehicleID": make_vehicleid_tree}[name](str(base))
    full = build_dataset(name, str(tmp_path))
    for d in drop:
        shutil.rmtree(base / d) if (base / d).is_dir() else os.remove(base / d)
    with pytest.raises(DatasetLayoutError):
        build_dataset(name, str(tmp_path))
    ds = build_dataset(name, str(tmp_path), test_only=True)
    assert ds.train == [] and ds.num_train_pids == 0
    assert ds.query == full.query and ds.gallery == full.gallery
    assert ds.num_train_cams == 1 + max(s[2] for s in ds.query + ds.gallery)


def test_test_only_missing_gallery_is_one_line(tmp_path):
    base = tmp_path / "Market-1501-v15.09.15"
    make_market_tree(str(base))
    import shutil
    shutil.rmtree(base / "bounding_box_test")
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset("market1501", str(tmp_path), test_only=True)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "bounding_box_test" in msg and "bounding_box_train" not in msg


def test_test_only_folder_keeps_the_training_camera_ids(tmp_path):
    """Dense camera ids of a 'folder' set depend on every camera seen: with the training folder
    present, test-only parsing gives the ids training used (the SIE table is indexed by them)."""
    write_images(str(tmp_path / "bounding_box_train"), market_names([(1, 1), (1, 2), (2, 3)]))
    write_images(str(tmp_path / "query"), market_names([(5, 2)]))
    write_images(str(tmp_path / "bounding_box_test"), market_names([(5, 3), (6, 3)]))
    full = build_dataset("folder", str(tmp_path))
    ds = build_dataset("folder", str(tmp_path), test_only=True)
    assert ds.query == full.query and ds.gallery == full.gallery and ds.train == []
    assert [s[2] for s in ds.query + ds.gallery] == [1, 2, 2]


# ------------------------------------------------------------------ published split statistics
def _stats_warnings(caplog, name, root, **kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svllreid"):
        ds = build_dataset(name, root, **kw)
    return ds, [r.getMessage() for r in caplog.records if "published statistics" in r.getMessage()]


def test_a_removed_image_is_reported_against_the_published_count(tmp_path, caplog, monkeypatch):
    """Counted, not read: the tiny Market tree stands for the benchmark with its own figures as the
    published ones (the full-size tree is the slow test below)."""
    from datasets.market1501 import Market1501
    monkeypatch.setattr(Market1501, "published_stats",
                        {"train": (4, 9, 6), "query": (2, 3, 3), "gallery": (3, 5, 5)})
    base = tmp_path / "Market-1501-v15.09.15"
    make_market_tree(str(base))
    assert _stats_warnings(caplog, "market1501", str(tmp_path))[1] == []
    os.remove(base / "bounding_box_test" / market_names(MARKET_GALLERY)[0])      # a 0020 image of camera 2
    _, found = _stats_warnings(caplog, "market1501", str(tmp_path))
    assert len(found) == 1 and "gallery: 4 images, published 5" in found[0] and str(base) in found[0]
    assert "DATASETS.STRICT_STATS True" in found[0] and "train:" not in found[0]
    with pytest.raises(DatasetError) as e:
        build_dataset("market1501", str(tmp_path), strict_stats=True)
    assert "gallery: 4 images, published 5" in str(e.value) and "\n" not in str(e.value)
    _, found = _stats_warnings(caplog, "market1501", str(tmp_path), test_only=True)   # evaluation: no train
    assert len(found) == 1 and "gallery: 4 images" in found[0]


def test_datasets_without_published_figures_never_warn(tmp_path, caplog):
    make_market_tree(str(tmp_path))
    assert _stats_warnings(caplog, "folder", str(tmp_path))[1] == []
    from tests.helpers import synthetic_set
    assert _stats_warnings(caplog, "folder", synthetic_set(tmp_path / "synthetic"))[1] == []


def test_every_benchmark_has_its_published_statistics():
    from datasets.factory import DATASETS
    tables = {name: cls.published_stats for name, cls in DATASETS.items() if name not in ("folder", "VehicleID")}
    assert tables["market1501"]["gallery"] == (None, 15913, 6) and tables["msmt17"]["train"] == (1041, 32621, 15)
    for name, table in tables.items():
        assert set(table) == {"train", "query", "gallery"} and all(table[s][1] for s in table), name
    vid = VehicleID.__new__(VehicleID)
    vid.test_size = 1600
    assert vid.published_statistics() == {"train": (13164, 113346, None), "query": (1600, 11777, None),
                                          "gallery": (1600, 1600, None)}


def _full_market_tree(base):
    """The published Market-1501 split sizes in zero-byte files (names are all the parser reads)."""
    def touch(sub, items):
        os.makedirs(base / sub)
        for i, (pid, cam) in enumerate(items):
            open(base / sub / f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg", "wb").close()
    touch("bounding_box_train", [(2 + i % 751, 1 + i % 6) for i in range(12936)])
    touch("query", [(1000 + i % 750, 1 + i % 6) for i in range(3368)])
    touch("bounding_box_test", [((1000 + i % 751) if i % 751 < 750 else 0, 1 + (i + 1) % 6) for i in range(15913)])


@pytest.mark.slow
def test_a_full_size_market_tree_missing_one_gallery_image(tmp_path, caplog):
    base = tmp_path / "Market-1501-v15.09.15"
    _full_market_tree(base)
    ds, found = _stats_warnings(caplog, "market1501", str(tmp_path))
    assert found == [] and ds.num_gallery_imgs == 15913 and ds.num_train_pids == 751
    os.remove(base / "bounding_box_test" / sorted(os.listdir(base / "bounding_box_test"))[-1])
    _, found = _stats_warnings(caplog, "market1501", str(tmp_path))
    assert len(found) == 1 and "Market-1501 in" in found[0] and "gallery: 15912 images, published 15913" in found[0]
