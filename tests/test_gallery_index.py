"""The gallery index (retrieval/index.py): the flat index ranks as the brute-force search does,
ivf-pq with exact re-ranking finds the exact neighbours, the folder is written atomically and read
back whole, and every bad input is one line."""
import json
import os

import faiss
import numpy as np
import pytest

from config import ConfigError, load_config
from retrieval import index as gx
from retrieval import index_store as store
from tests.helpers import paren_depth, tool_opts
from utils.distance import DistanceSpec
from utils.errors import UserError
from utils.fileio import open_npz_array
from utils.visualize import ranked_indices

SETTINGS = [("yes", "euclidean"), ("yes", "cosine"), ("no", "euclidean"), ("no", "cosine")]


def _cfg(feat_norm, dist_metric, *extra):
    return load_config("", ["TEST.FEAT_NORM", feat_norm, "TEST.DIST_METRIC", dist_metric, *extra])


def _clustered(n, d, ids, seed, spread=0.15):
    """``n`` vectors around ``ids`` random centres (identities), as ReID features cluster."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1000).normal(size=(ids, d))
    labels = rng.integers(0, ids, n)
    return (centres[labels] + spread * rng.normal(size=(n, d))).astype(np.float32)


def _brute(cfg, q, g, k):
    """Today's search: the evaluation's distance matrix, ranked by ``ranked_indices``."""
    dist = DistanceSpec.from_cfg(cfg).matrix(q, g)
    order = ranked_indices(dist)[:, :k]
    return np.take_along_axis(dist.numpy(), order, 1), order


# ----------------------------------------------------------------------------- exact kinds
@pytest.mark.parametrize("feat_norm,dist_metric", SETTINGS)
def test_flat_index_ranks_as_the_brute_force_search(feat_norm, dist_metric):
    rng = np.random.default_rng(0)
    g = (rng.normal(size=(300, 32)) / 3).astype(np.float32)
    g[[10, 200, 250]] = g[5]                    # duplicates: equal distances, kept in gallery order
    q = np.concatenate([(rng.normal(size=(20, 32)) / 3).astype(np.float32), g[[5, 7]]])
    cfg = _cfg(feat_norm, dist_metric)
    gi = gx.build_index([g[:120], g[120:]], gx.metric_from_config(cfg), gx.choose_params(len(g), 32, "flat"))
    for k in (1, 7, 300):
        d, i = gx.search(gi, q, k)
        bd, bi = _brute(cfg, q, g, k)
        np.testing.assert_array_equal(i, bi)
        np.testing.assert_allclose(d, bd, atol=1e-5, rtol=0)
    _, i = gx.search(gi, g[[5]], 4)
    assert i[0].tolist() == [5, 10, 200, 250]


@pytest.mark.parametrize("feat_norm,dist_metric", [("yes", "euclidean"), ("no", "cosine")])
def test_exact_search_over_memmapped_parts_equals_brute_force(tmp_path, feat_norm, dist_metric):
    g = _clustered(500, 16, 40, seed=1)
    q = _clustered(30, 16, 40, seed=2)
    np.savez(tmp_path / "a.npz", features=g[:200])
    np.savez(tmp_path / "b.npz", features=g[200:])
    parts = [open_npz_array(str(tmp_path / f"{x}.npz"), "features") for x in "ab"]
    assert all(isinstance(p, np.memmap) for p in parts)
    cfg = _cfg(feat_norm, dist_metric)
    d, i = gx.exact_search(parts, gx.metric_from_config(cfg), q, 12)
    bd, bi = _brute(cfg, q, g, 12)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, atol=1e-5, rtol=0)


def test_exact_top_k_keeps_every_tie_in_gallery_order_across_blocks(monkeypatch):
    """Integer features give many exactly equal distances, also at the k-th place of a block: the
    top-k over small blocks equals a stable sort of the whole distance matrix."""
    rng = np.random.default_rng(3)
    g = rng.integers(0, 3, size=(700, 4)).astype(np.float32)
    q = rng.integers(0, 3, size=(9, 4)).astype(np.float32)
    metric = DistanceSpec(False, "euclidean")
    full = ((q[:, None, :] - g[None]) ** 2).sum(-1)
    monkeypatch.setattr(gx, "BLOCK_ELEMS", 9 * 50)        # blocks of 50 rows, chunks of 112
    for k in (1, 5, 37, 50, 51, 700):
        d, i = gx.exact_search([g[:333], g[333:]], metric, q, k)
        want = np.argsort(full, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(i, want)
        np.testing.assert_array_equal(d, np.take_along_axis(full, want, 1))


def test_npz_members_are_memory_mapped_and_read_exactly(tmp_path):
    a = np.arange(60, dtype=np.float32).reshape(20, 3)
    names = np.array(["x/0001_c1.jpg", "b.png"])
    np.savez(tmp_path / "s.npz", features=a, paths=names, empty=np.zeros((0, 4)))
    np.savez_compressed(tmp_path / "c.npz", features=a)
    m = open_npz_array(str(tmp_path / "s.npz"), "features")
    assert isinstance(m, np.memmap) and np.array_equal(m, a)
    assert np.array_equal(open_npz_array(str(tmp_path / "s.npz"), "paths"), names)
    assert open_npz_array(str(tmp_path / "s.npz"), "empty").shape == (0, 4)
    assert np.array_equal(open_npz_array(str(tmp_path / "c.npz"), "features"), a)     # compressed: read
    with pytest.raises(KeyError):
        open_npz_array(str(tmp_path / "s.npz"), "pids")


# ----------------------------------------------------------------------------- approximate kinds
def test_ivf_pq_with_refine_finds_the_exact_neighbours():
    """Clustered data (300 identities of about 13 images, 64-d): with the parameters chosen from the
    size and 10 x k candidates re-ranked exactly, recall@1 and recall@10 against the exact search
    are at least 0.95. The neighbours of a query are its identity's images, which the coarse
    quantiser puts in the same few lists and whose PQ estimates rank them above the others, so
    only the identity's images the probed lists miss remain: 0.97 to 1.0 over several seeds of this
    data, both metrics. The PQ estimates alone (4 x 6-bit codes) rank an identity's images almost at
    random among themselves (recall@1 about 0.1): the re-ranking does the work."""
    g = _clustered(4000, 64, 300, seed=3)
    q = _clustered(200, 64, 300, seed=4)
    metric = DistanceSpec(True, "cosine")
    params = gx.choose_params(len(g), 64, "ivf-pq", threads=1)
    gi = gx.build_index(g, metric, params)
    assert gi.vectors is not None and gi.vectors.dtype == np.float16
    _, exact = gx.exact_search(g, metric, q, 10)
    d, approx = gx.search(gi, q, 10)
    assert gx.recall_at_k(approx, exact, 1) >= 0.95
    assert gx.recall_at_k(approx, exact, 10) >= 0.95
    assert np.all(np.diff(d, axis=1) >= 0)
    # re-ranked distances are the project's formula on the float16 vectors the index keeps
    g16 = gx.prepare(g, metric).astype(np.float16).astype(np.float32)
    ref = 1 - gx.prepare(q, metric) @ g16.T
    np.testing.assert_allclose(d, np.take_along_axis(ref, approx, 1), atol=1e-5, rtol=0)
    _, pq_only = gx.search(gi, q, 10, refine=0)
    assert gx.recall_at_k(pq_only, exact, 1) < gx.recall_at_k(approx, exact, 1)
    m = gx.measure_recall(gi, g, 100)
    assert m["queries"] == 100 and m["recall@1"] >= 0.95 and m["recall@10"] >= 0.95


def test_lists_too_short_for_k_are_completed_by_scanning_every_list():
    """nprobe 1 of 50 lists holds about 4 of 200 vectors, fewer than k = 20: those queries scan all
    lists, and with 10 x k >= n candidates re-ranked the result is the exact ranking of the float16
    vectors the index keeps."""
    g = _clustered(200, 16, 50, seed=8)
    q = _clustered(10, 16, 50, seed=9)
    metric = DistanceSpec(True, "euclidean")
    gi = gx.build_index(g, metric, gx.choose_params(200, 16, "ivf-pq", nlist=50, nprobe=1, threads=1))
    d, i = gx.search(gi, q, 20)
    assert (i >= 0).all() and all(len(set(row)) == 20 for row in i.tolist())
    g16 = gx.prepare(g, metric).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(i, gx.exact_search(g16, DistanceSpec(False, "euclidean"), gx.prepare(q, metric),
                                                     20)[1])


def test_chosen_parameters_follow_the_size():
    p = gx.choose_params(1_000_000, 1280, "ivf-pq")
    assert (p["nlist"], p["m"], p["nbits"], p["nprobe"], p["refine"]) == (1000, 32, 8, 125, 10)
    assert 40 * p["nlist"] <= p["train_size"] <= 100 * p["nlist"] and 1 <= p["nprobe"] <= p["nlist"]
    assert gx.choose_params(400_000_000, 1280, "ivf-pq")["train_size"] == gx.TRAIN_CAP
    assert gx.choose_params(100_000_000, 1280, "ivf-pq")["nlist"] <= gx.TRAIN_CAP // 39
    small = gx.choose_params(2000, 512, "ivf-pq")
    assert small["nlist"] <= 2000 // 39 and 2 ** small["nbits"] <= small["train_size"] <= 2000
    assert 512 % small["m"] == 0
    given = gx.choose_params(10_000, 1280, "ivf-pq", nlist=50, m=160, nprobe=5, refine=0)
    assert (given["nlist"], given["m"], given["nprobe"], given["refine"]) == (50, 160, 5, 0)
    assert set(gx.choose_params(10, 8, "flat")) == {"kind", "add_batch", "threads"}
    assert gx.default_kind(1000, 1280, memory_bytes=16 << 30)[0] == "flat"
    assert gx.default_kind(100_000_000, 1280, memory_bytes=128 << 30)[0] == "ivf-pq"


@pytest.mark.parametrize("kw,needles", [
    (dict(m=7), ["--m 7", "divide", "1280"]),
    (dict(nprobe=99, nlist=10), ["--nprobe 99", "nlist 10"]),
    (dict(nlist=20_000), ["--nlist 20000", "10000"]),
    (dict(refine=-1), ["--refine -1"]),
    (dict(kind="hnsw"), ["--kind 'hnsw'", "flat"]),
    (dict(kind="flat", nlist=8), ["--nlist", "ivf-pq only"]),
])
def test_bad_parameters_are_one_line(kw, needles):
    kind = kw.pop("kind", "ivf-pq")
    with pytest.raises(ConfigError) as e:
        gx.choose_params(10_000, 1280, kind, **kw)
    assert len(str(e.value).splitlines()) == 1 and all(n in str(e.value) for n in needles), str(e.value)


def test_recall_at_k_counts_the_exact_neighbours_found():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert gx.recall_at_k(np.array([[3, 9, 1], [7, 8, 9]]), exact, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert gx.recall_at_k(np.array([[2, 1, 3], [4, 0, 0]]), exact, 1) == 0.5


# ----------------------------------------------------------------------------- refusals
def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match="TEST.RE_RANKING"):
        gx.metric_from_config(_cfg("yes", "euclidean", "TEST.RE_RANKING", "True"))
    with pytest.raises(UserError, match="empty"):
        gx.build_index(np.zeros((0, 8), np.float32), DistanceSpec(True, "cosine"), {"kind": "flat"})
    with pytest.raises(UserError, match="empty"):
        gx.choose_params(0, 8, "flat")
    with pytest.raises(ConfigError, match="ivf-pq needs at least 2 gallery images"):
        gx.choose_params(1, 8, "ivf-pq")
    g = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    gi = gx.build_index(g, DistanceSpec(True, "cosine"), gx.choose_params(5, 8, "flat"))
    with pytest.raises(ConfigError, match=r"--topk 6 is more than the 5 images"):
        gx.search(gi, g, 6)
    g[3, 2] = np.inf
    with pytest.raises(UserError, match="gallery feature 3 .*NaN/Inf"):
        gx.build_index([g[:2], g[2:]], DistanceSpec(True, "cosine"), gx.choose_params(5, 8, "flat"))


# ----------------------------------------------------------------------------- the folder
def _items(n):
    return gx.Items(np.array([f"d/{i:04d}_c1s1_{i:06d}_00.jpg" for i in range(n)]), np.arange(n) % 7,
                    np.arange(n) % 2, "/data/gallery")


@pytest.fixture(scope="module")
def ivf_dir(tmp_path_factory):
    g = _clustered(2000, 32, 150, seed=5)
    out = str(tmp_path_factory.mktemp("idx") / "index")
    params = gx.choose_params(len(g), 32, "ivf-pq", threads=1)
    gi = store.write_index(out, g, DistanceSpec(True, "euclidean"), params, _items(len(g)),
                        {"sha256": "ab" * 32, "model_name": "ViT-B-16", "feat_dim": 32},
                        measure=lambda built: {"recall": gx.measure_recall(built, g, 50)})
    return out, g, gi


def test_written_folder_reads_back_and_searches_the_same(ivf_dir, tmp_path):
    out, g, gi = ivf_dir
    assert sorted(os.listdir(out)) == sorted([store.INDEX_FILE, store.VECTORS_FILE, store.ITEMS_FILE, store.INFO_FILE])
    with open(os.path.join(out, store.INFO_FILE)) as f:
        info = json.load(f)
    assert (info["kind"], info["n"], info["d"], info["model"]["sha256"]) == ("ivf-pq", 2000, 32, "ab" * 32)
    assert info["metric"] == {"feat_norm": True, "dist_metric": "euclidean", "distance": "squared euclidean"}
    assert info["params"]["nlist"] == gi.params["nlist"] and info["recall"]["queries"] == 50
    loaded = store.load_index(out)
    assert isinstance(loaded.vectors, np.memmap) and loaded.vectors.dtype == np.float16
    assert loaded.items.path(3) == "/data/gallery/d/0003_c1s1_000003_00.jpg" and loaded.items.pids[9] == 2
    q = _clustered(40, 32, 150, seed=6)
    d1, i1 = gx.search(gi, q, 5)
    d2, i2 = gx.search(loaded, q, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    # an in-memory flat index saved, loaded and searched: the same ranking
    flat = gx.build_index(g, DistanceSpec(False, "euclidean"), gx.choose_params(len(g), 32, "flat"))
    flat.items = _items(len(g))
    store.save_index(str(tmp_path / "flat"), flat)
    np.testing.assert_array_equal(gx.search(store.load_index(str(tmp_path / "flat")), q, 5)[1],
                                  gx.search(flat, q, 5)[1])
    assert not os.path.exists(tmp_path / "flat" / store.VECTORS_FILE)


def _damage(src, dst, name, data):
    import shutil
    shutil.copytree(src, dst)
    if data is None:
        os.remove(os.path.join(dst, name))
    else:
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)
    return str(dst)


@pytest.mark.parametrize("name,data,needles", [
    (store.INFO_FILE, b"{\"format\": ", ["index.json is damaged", "not JSON"]),
    (store.INFO_FILE, b"[1, 2]", ["index.json is damaged"]),
    (store.INFO_FILE, b"{\"format\": \"svllreid-gallery-index\", \"version\": 1, \"kind\": \"flat\"}",
     ["index.json is damaged", "missing entry"]),
    (store.INFO_FILE, None, ["not an index folder"]),
    (store.INDEX_FILE, b"not a faiss index at all", ["index.faiss is damaged"]),
    (store.INDEX_FILE, None, ["index.faiss is missing"]),
    (store.ITEMS_FILE, b"PK\x03\x04junk", ["items.npz is damaged"]),
    (store.VECTORS_FILE, None, ["vectors.f16.npy is missing"]),
])
def test_damaged_index_folder_is_one_line(ivf_dir, tmp_path, name, data, needles):
    folder = _damage(ivf_dir[0], tmp_path / "bad", name, data)
    with pytest.raises(UserError) as e:
        store.load_index(folder)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and all(n in msg for n in needles), msg
    assert "tools/build_index.py" in msg


def test_truncated_index_faiss_is_one_line(ivf_dir, tmp_path):
    with open(os.path.join(ivf_dir[0], store.INDEX_FILE), "rb") as f:
        head = f.read(5000)
    folder = _damage(ivf_dir[0], tmp_path / "cut", store.INDEX_FILE, head)
    with pytest.raises(UserError) as e:
        store.load_index(folder)
    assert "index.faiss is damaged" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_interrupted_build_leaves_no_index_and_keeps_the_old_one(tmp_path, monkeypatch):
    g = _clustered(300, 16, 20, seed=7)
    metric, params = DistanceSpec(True, "cosine"), gx.choose_params(300, 16, "flat")
    params["add_batch"] = 100
    calls = []
    original = gx.prepare

    def interrupted(x, m):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(x, m)
    monkeypatch.setattr(gx, "prepare", interrupted)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        store.write_index(str(out), g, metric, params, _items(300), {})
    assert os.listdir(tmp_path) == []                  # no INDEX_DIR, no staging folder left
    monkeypatch.setattr(gx, "prepare", original)
    store.write_index(str(out), g, metric, params, _items(300), {"sha256": "old"})
    monkeypatch.setattr(gx, "prepare", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        store.write_index(str(out), g[:200], metric, params, _items(200), {"sha256": "new"})
    assert os.listdir(tmp_path) == ["index"] and store.load_index(str(out)).model["sha256"] == "old"
    # a build killed outright: its staging folder goes at the next build; an old index it had moved
    # aside (killed between the two renames) comes back
    monkeypatch.setattr(gx, "prepare", original)
    dead = 2 ** 22 + 12345
    while store._pid_alive(dead):
        dead += 1
    os.makedirs(tmp_path / f"{store.STAGING_PREFIX}index-{dead}")
    os.replace(out, tmp_path / f"{store.OLD_PREFIX}index-{dead}")
    store._recover(str(out))
    assert os.listdir(tmp_path) == ["index"] and store.load_index(str(out)).model["sha256"] == "old"


@pytest.mark.parametrize("kind", ["flat", "ivf-pq"])
def test_a_full_disk_is_one_line_and_leaves_the_old_index(tmp_path, monkeypatch, kind):
    """The disk fills up while an index is written (faiss's write error for index.faiss; ENOSPC for
    the float16 vectors, written front to back, never through a memory map, which would end the
    process with SIGBUS): one line, the earlier index untouched, no half folder left."""
    import errno
    g = _clustered(500, 16, 20, seed=8)
    metric = DistanceSpec(True, "euclidean")
    params = gx.choose_params(500, 16, kind, threads=1, **({"nlist": 4} if kind == "ivf-pq" else {}))
    out = tmp_path / "index"
    store.write_index(str(out), g, metric, params, _items(500), {"sha256": "old"})
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    if kind == "flat":
        def full(index, path):
            raise RuntimeError(f"Error in faiss::FileIOWriter::operator() at faiss/impl/io.cpp:102: Error: 'ret == n' "
                               f"failed: write error in {path}: 0 != 1 (No space left on device)")
        monkeypatch.setattr(faiss, "write_index", full)
    else:
        def no_memory_map(*a, **k):
            raise AssertionError("a memory-mapped write: on a full disk the process would die of SIGBUS")
        monkeypatch.setattr(np.lib.format, "open_memmap", no_memory_map)
        real_open = open

        class FullDisk:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device", self.f.name)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def opened(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            return FullDisk(f) if "w" in mode and os.path.basename(path) == store.VECTORS_FILE else f
        monkeypatch.setattr(gx, "open", opened, raising=False)
    with pytest.raises(UserError) as e:
        store.write_index(str(out), g[:300], metric, params, _items(300), {"sha256": "new"})
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "disk full" in msg and str(out) in msg, msg
    assert ("write error in" if kind == "flat" else "No space left on device") in msg
    assert os.listdir(tmp_path) == ["index"]                          # no staging folder left
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_an_index_that_cannot_fit_is_refused_before_the_build(tmp_path, monkeypatch):
    import collections
    g = _clustered(500, 16, 20, seed=8)
    params = gx.choose_params(500, 16, "flat")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 1000, 1000))
    with pytest.raises(UserError, match=r"needs about 87\.9 KB .* has 1000 B free"):
        store.write_index(str(tmp_path / "index"), g, DistanceSpec(True, "cosine"), params, _items(500), {})
    assert os.listdir(tmp_path) == []


def test_out_that_is_not_an_index_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    g = np.ones((3, 4), np.float32)
    with pytest.raises(UserError, match="not an index folder"):
        store.write_index(str(tmp_path / "notes"), g, DistanceSpec(True, "cosine"), gx.choose_params(3, 4, "flat"),
                       _items(3), {})
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- the tools
def _build(tiny_root, weight, features, out, *flags):
    from tests.helpers import DEMO
    from tools import build_index
    return build_index.main(["--config_file", DEMO, "--features", *map(str, features), "--out", str(out),
                             *tool_opts(tiny_root, weight), *flags])


def _search(tiny_root, weight, where, gallery, out, *flags):
    from tests.helpers import DEMO
    from tools import search
    return search.main(["--config_file", DEMO, "--query", os.path.join(tiny_root, "query"), where, str(gallery),
                        "--out", str(out), *tool_opts(tiny_root, weight), *flags])


def _rewrite(src, dst, meta=None, **changes):
    """A copy of the .npz ``src`` with some arrays (or meta entries) replaced."""
    z = dict(np.load(src))
    if meta is not None:
        z["meta"] = np.array(json.dumps({**json.loads(str(z["meta"])), **meta}))
    z.update(changes)
    np.savez(dst, **z)
    return dst


def test_features_option_takes_several_paths_before_the_overrides():
    from tools import build_index
    a = build_index.parse_args(["--features", "a.npz", "parts", "TEST.FEAT_NORM", "no", "--out", "i", "--kind",
                                "ivf-pq", "OUTPUT_DIR", "x", "--features", "c.npz"])
    assert (a.features, a.out, a.kind) == (["a.npz", "parts", "c.npz"], "i", "ivf-pq")
    assert a.opts == ["TEST.FEAT_NORM", "no", "OUTPUT_DIR", "x"]
    a = build_index.parse_args(["--out", "i", "--features", "a.npz", "b.npz", "--m", "8"])
    assert (a.features, a.m) == (["a.npz", "b.npz"], 8)


def test_feature_files_record_the_checkpoint(gallery_npz, weight):
    import hashlib
    meta = json.loads(str(np.load(gallery_npz)["meta"]))
    with open(weight, "rb") as f:
        assert meta["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert (meta["model_name"], meta["feat_norm"], meta["neck_feat"], meta["feat_dim"]) == \
        ("ViT-B-16", "yes", "before", 128)


@pytest.mark.slow
@pytest.mark.parametrize("settings,kind", [((), "flat"), (("TEST.DIST_METRIC", "cosine"), "flat"),
                                           (("TEST.FEAT_NORM", "no"), "ivf-pq")])
def test_search_index_gives_the_results_of_search_gallery(tiny_root, weight, gallery_npz, tmp_path, settings, kind):
    """The same results.json (paths, ranks, labels; distances within 1e-5) and pictures. ivf-pq
    re-ranks 10 x k candidates of a 14-image gallery exactly: every image, so its ranking is exact
    too; its distances are of the float16 vectors it keeps (within float16 rounding, 2**-11)."""
    assert _build(tiny_root, weight, [gallery_npz], tmp_path / "index", "--kind", kind, *settings) == 0
    res = {}
    for where, gallery in (("--index", tmp_path / "index"), ("--gallery", gallery_npz)):
        out = tmp_path / where.strip("-")
        assert _search(tiny_root, weight, where, gallery, out, "--topk", "6", *settings) == 0
        with open(out / "results.json") as f:
            res[where] = json.load(f)
    a, b = res["--index"], res["--gallery"]
    assert a["index"]["kind"] == kind and a["gallery"] == str(tmp_path / "index")
    for key in ("checkpoint", "distance", "topk", "num_gallery", "junk_left_out"):
        assert a[key] == b[key], key
    assert a["junk_left_out"] == 1 and a["num_gallery"] == 14
    assert [q["query"] for q in a["queries"]] == [q["query"] for q in b["queries"]]
    for qa, qb in zip(a["queries"], b["queries"]):
        strip = [{k: v for k, v in h.items() if k != "distance"} for h in qa["results"]]
        assert strip == [{k: v for k, v in h.items() if k != "distance"} for h in qb["results"]]
        tol = dict(abs=1e-5) if kind == "flat" else dict(rel=2e-3, abs=1e-3)
        assert [h["distance"] for h in qa["results"]] == pytest.approx([h["distance"] for h in qb["results"]], **tol)
        assert os.path.isfile(qa["picture"]) and os.path.basename(qa["picture"]) == os.path.basename(qb["picture"])


def test_build_index_refusals_are_one_line(tiny_root, weight, gallery_npz, tmp_path, capsys):
    from tests.helpers import one_line_error
    z = np.load(gallery_npz)
    n = len(z["paths"])
    parts = tmp_path / "parts"
    parts.mkdir()
    _rewrite(gallery_npz, parts / "part-00000-of-00002.npz")
    narrow = _rewrite(gallery_npz, tmp_path / "narrow.npz", meta={"feat_dim": 64}, features=z["features"][:, :64])
    other = _rewrite(gallery_npz, tmp_path / "other.npz", meta={"sha256": "0" * 64})
    empty = _rewrite(gallery_npz, tmp_path / "empty.npz", features=np.zeros((0, 128), np.float32),
                     paths=np.array([], dtype=str), pids=np.zeros(0, np.int64), camids=np.zeros(0, np.int64))
    junk_only = _rewrite(gallery_npz, tmp_path / "junk.npz", paths=np.array([f"-1_c1s1_{i:06d}_00.jpg"
                                                                            for i in range(n)]))
    no_sha = {k: v for k, v in json.loads(str(z["meta"])).items() if k != "sha256"}
    gone = tmp_path / "gone.npz"
    np.savez(gone, **{**dict(z), "meta": np.array(json.dumps({**no_sha, "weight": str(tmp_path / "nope.pth")}))})
    (tmp_path / "afile").write_text("x")
    cases = [([parts], [], [str(parts), "1 of 2 parts missing", "part-00001-of-00002.npz"]),
             ([tmp_path / "nope.npz"], [], ["no such feature file", "nope.npz"]),
             ([gallery_npz, narrow], [], ["different widths", "128 vs 64"]),
             ([gallery_npz, other], [], ["extracted differently", "sha256"]),
             ([empty], [], ["empty.npz", "no features (0 images)", "nothing to index"]),
             ([junk_only], [], [f"all {n} images are junk", "nothing to index"]),
             ([gone], [], ["records no checkpoint sha256", "nope.pth"]),
             ([gallery_npz], ["TEST.RE_RANKING", "True"], ["TEST.RE_RANKING True"]),
             ([gallery_npz], ["--kind", "ivf-pq", "--m", "7"], ["--m 7", "divide", "128"]),
             ([gallery_npz], ["--kind", "flat", "--nprobe", "3"], ["--nprobe", "ivf-pq only"])]
    for features, flags, needles in cases:
        assert _build(tiny_root, weight, features, tmp_path / "index", *flags) == 2, needles
        one_line_error(capsys, *needles)
        assert not os.path.exists(tmp_path / "index")
    assert _build(tiny_root, weight, [gallery_npz], tmp_path / "afile") == 2
    one_line_error(capsys, "afile", "is a file")
    # the same file twice (also under another name), a merged file and its parts: each image once
    os.symlink(gallery_npz, tmp_path / "alias.npz")
    merged = tmp_path / "merged.npz"
    _rewrite(gallery_npz, merged)
    whole = tmp_path / "whole"
    whole.mkdir()
    _rewrite(gallery_npz, whole / "part-00000-of-00001.npz")
    for features, needles in [([gallery_npz, gallery_npz], ["given twice", str(gallery_npz)]),
                              ([gallery_npz, tmp_path / "alias.npz"], ["given twice", "alias.npz"]),
                              ([whole, whole / "part-00000-of-00001.npz"], ["given twice"]),
                              ([merged, whole], ["is in two of the feature files", "indexed once"])]:
        assert _build(tiny_root, weight, features, tmp_path / "index") == 2, needles
        one_line_error(capsys, *needles)
        assert not os.path.exists(tmp_path / "index")
    # a file written before the sha256 was recorded: computed from its checkpoint when that still exists
    np.savez(tmp_path / "old.npz", **{**dict(z), "meta": np.array(json.dumps(no_sha))})
    assert _build(tiny_root, weight, [tmp_path / "old.npz"], tmp_path / "index") == 0
    assert store.load_index(str(tmp_path / "index")).model["sha256"] == json.loads(str(z["meta"]))["sha256"]


def test_search_index_refusals_are_one_line(tiny_root, weight, gallery_npz, tmp_path, capsys):
    from tests.helpers import one_line_error
    z = np.load(gallery_npz)
    index = tmp_path / "index"
    assert _build(tiny_root, weight, [gallery_npz], index) == 0
    other = tmp_path / "other"
    assert _build(tiny_root, weight, [_rewrite(gallery_npz, tmp_path / "o.npz", meta={"sha256": "f" * 64})],
                  other) == 0
    narrow = tmp_path / "narrow"
    assert _build(tiny_root, weight, [_rewrite(gallery_npz, tmp_path / "n.npz", meta={"feat_dim": 64},
                                               features=z["features"][:, :64])], narrow) == 0
    rn50 = tmp_path / "rn50"
    assert _build(tiny_root, weight, [_rewrite(gallery_npz, tmp_path / "r.npz", meta={"model_name": "RN50"})],
                  rn50) == 0
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(index, broken)
    (broken / store.INFO_FILE).write_text("{ not json")
    capsys.readouterr()
    cases = [(other, [], ["model.pth", "is not the checkpoint of", str(other), "ffffffffffff"]),
             (index, ["TEST.DIST_METRIC", "cosine"], ["TEST.DIST_METRIC cosine", "built for euclidean"]),
             (index, ["TEST.FEAT_NORM", "no"], ["TEST.FEAT_NORM no", "TEST.FEAT_NORM yes"]),
             (index, ["TEST.NECK_FEAT", "after"], ["TEST.NECK_FEAT after", "before the BNNeck"]),
             (index, ["TEST.RE_RANKING", "True"], ["TEST.RE_RANKING True"]),
             (index, ["--topk", "15"], ["--topk 15 is more than the 14 images", str(index)]),
             (narrow, [], ["128-d features", "holds 64-d"]),
             (rn50, [], ["ViT-B-16", "is not the RN50"]),
             (broken, [], [f"{broken / store.INFO_FILE} is damaged", "build_index.py"]),
             (tmp_path / "none", [], ["no such index folder"])]
    for where, flags, needles in cases:
        assert _search(tiny_root, weight, "--index", where, tmp_path / "out", "--no_pictures", *flags) == 2, needles
        one_line_error(capsys, *needles)
        assert not os.path.exists(tmp_path / "out" / "results.json")


def test_interrupted_build_index_leaves_no_index(tiny_root, weight, gallery_npz, tmp_path, monkeypatch, capsys):
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(faiss.IndexFlatL2, "add", interrupted)
    assert _build(tiny_root, weight, [gallery_npz], tmp_path / "index", "--kind", "flat") == 130
    assert os.listdir(tmp_path) == []


def test_too_few_vectors_for_the_code_books_advise_flat_not_a_smaller_nlist(caplog):
    """The k-means warning names what is too large: with one list, the code books' centroids are the
    many ones, and a smaller --nlist cannot help (it did say so); the tiny gallery wants --kind flat."""
    g = _clustered(60, 16, 10, seed=3)
    params = gx.choose_params(60, 16, "ivf-pq", nlist=1, threads=1)
    assert 2 ** params["nbits"] > params["nlist"]
    with caplog.at_level("WARNING", logger="svllreid"):
        gx.build_index(g, DistanceSpec(True, "euclidean"), params)
    warned = " ".join(r.getMessage() for r in caplog.records if "training vectors" in r.getMessage())
    assert "--kind flat" in warned and "smaller --nlist" not in warned
    assert paren_depth(warned) <= 1


def test_the_chosen_kind_reason_nests_no_parentheses():
    for n in (1000, 100_000_000):
        reason = gx.default_kind(n, 1280, memory_bytes=16 << 30)[1]
        assert paren_depth(reason) == 0, reason
