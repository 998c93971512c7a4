"""Sharded feature extraction (tools/extract_features.py under torchrun) and reading parts back
(retrieval.feature_parts): the parts concatenated in rank order are the one-process file; a run
again redoes only the missing parts; bad part folders and mixes of feature files are refused
in one line."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrieval import features as folder_features
from retrieval.feature_parts import load_features, parse_part_name, part_name, shard_bounds
from retrieval.features import FeatureSet
from tests.helpers import DEMO, ROOT, one_line_error
from tools import extract_features as extract_tool
from tools import launch
from utils.errors import UserError
from utils.fileio import TMP_PREFIX, TMP_SUFFIX

SIZE = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0",
        "TEST.IMS_PER_BATCH", "8", "DATALOADER.READ_RETRIES", "0"]
ARRAYS = ("features", "paths", "pids", "camids", "failed", "failed_reasons", "root", "meta")


@pytest.fixture(scope="module")
def images(tiny_root, tmp_path_factory):
    """The tiny gallery (junk and distractors included) in sub-folders, with one unreadable file."""
    d = tmp_path_factory.mktemp("images") / "gallery"
    src = os.path.join(tiny_root, "bounding_box_test")
    for i, name in enumerate(sorted(os.listdir(src))):
        os.makedirs(d / f"day{i % 2}", exist_ok=True)
        shutil.copy(os.path.join(src, name), d / f"day{i % 2}" / name)
    (d / "day1" / "0001_c1s1_009999_01.jpg").write_bytes(b"not an image")
    return str(d)


def _argv(tiny_root, weight, images, out, *flags):
    return ["--config_file", DEMO, "--images", str(images), "--out", str(out), *map(str, flags),
            "DATASETS.ROOT_DIR", str(tiny_root), *SIZE, "TEST.WEIGHT", str(weight)]


@pytest.fixture(scope="module")
def one_process(tiny_root, weight, images, tmp_path_factory):
    """The single file of one process (today's behaviour), the reference of every sharded run."""
    out = tmp_path_factory.mktemp("single") / "feats.npz"
    assert extract_tool.main(_argv(tiny_root, weight, images, out)) == 0
    return str(out)


class _Collectives:
    """``all_gather_object`` of ranks run one after the other in this process: the n-th gather of a
    rank returns what the ranks run before gave at their n-th (a rank not run yet: like this one)."""

    def __init__(self, world):
        self.world, self.seen = world, {}

    def of_rank(self, rank):
        calls = iter(range(1000))

        def gather(obj):
            i = next(calls)
            self.seen[i, rank] = obj
            return [self.seen.get((i, r), obj) for r in range(self.world)]
        return gather


def _run_ranks(monkeypatch, argv, world, ranks=None):
    """The tool as each rank of ``world`` in turn in this process (the highest first, so that rank 0,
    which merges, comes last); their exit codes."""
    codes, coll = [], _Collectives(world)
    for r in sorted(range(world) if ranks is None else ranks, reverse=True):
        with monkeypatch.context() as m:
            m.setattr(extract_tool, "world_processes", lambda: world)
            m.setattr(extract_tool, "get_rank", lambda r=r: r)
            m.setattr(extract_tool, "get_world_size", lambda: world)
            m.setattr(extract_tool, "all_gather_object", coll.of_rank(r))
            codes.append(extract_tool.main(argv))
    return codes


def _assert_same_file(a, b):
    za, zb = np.load(a), np.load(b)
    assert sorted(za.files) == sorted(zb.files) == sorted(ARRAYS)
    for k in ARRAYS:
        if k == "features":
            assert za[k].shape == zb[k].shape
            assert np.abs(za[k] - zb[k]).max() <= 1e-6
        else:
            assert za[k].tolist() == zb[k].tolist(), k


# ----------------------------------------------------------------------------- shards
def test_shards_are_contiguous_disjoint_and_in_rank_order():
    for n in (0, 1, 2, 7, 15, 16, 1001):
        for world in (1, 2, 3, 4, 8, 20):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))     # each starts where the last stopped
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1                              # balanced
    assert part_name(0, 2) == "part-00000-of-00002.npz" and part_name(11, 12) == "part-00011-of-00012.npz"
    assert parse_part_name("/x/part-00003-of-00004.npz") == (3, 4)
    assert parse_part_name("part-00004-of-00004.npz") is None and parse_part_name("feats.npz") is None
    with pytest.raises(ValueError):
        part_name(2, 2)


def test_parts_merge_to_the_one_process_file(tiny_root, weight, images, one_process, tmp_path, monkeypatch):
    """3 ranks (uneven shares, the unreadable file in one of them): parts in rank order, the merged
    file and load_features of the folder all equal the one-process file."""
    parts = tmp_path / "parts"
    merged = tmp_path / "merged.npz"
    assert _run_ranks(monkeypatch, _argv(tiny_root, weight, images, parts, "--merge", merged), 3) == [0, 0, 0]
    assert sorted(os.listdir(parts)) == [part_name(r, 3) for r in range(3)]
    _assert_same_file(merged, one_process)
    one = FeatureSet.load(one_process)
    n_files = len(one.paths) + len(one.failed)
    sizes = [len(FeatureSet.load(str(parts / part_name(r, 3)), allow_empty=True).paths) +
             len(FeatureSet.load(str(parts / part_name(r, 3)), allow_empty=True).failed) for r in range(3)]
    assert sizes == [b - a for a, b in (shard_bounds(n_files, r, 3) for r in range(3))]
    fs = load_features([str(parts)])
    assert fs.paths == one.paths and fs.failed == one.failed and fs.meta == one.meta
    assert np.abs(fs.features - one.features).max() <= 1e-6
    assert fs.pids.tolist() == one.pids.tolist() and fs.camids.tolist() == one.camids.tolist()
    # the merge alone, later, as one process: the same file again
    assert extract_tool.main(["--out", str(parts), "--merge", str(tmp_path / "again.npz")]) == 0
    _assert_same_file(tmp_path / "again.npz", one_process)


def test_more_processes_than_images_give_empty_parts(tiny_root, weight, images, tmp_path, monkeypatch):
    few = tmp_path / "few"
    few.mkdir()
    for name in sorted(os.listdir(os.path.join(images, "day0")))[:2]:
        shutil.copy(os.path.join(images, "day0", name), few / name)
    assert extract_tool.main(_argv(tiny_root, weight, few, tmp_path / "one.npz")) == 0
    parts = tmp_path / "parts"
    assert _run_ranks(monkeypatch, _argv(tiny_root, weight, few, parts, "--merge", tmp_path / "m.npz"), 3) == [0] * 3
    assert [len(FeatureSet.load(str(parts / part_name(r, 3)), allow_empty=True).paths) for r in range(3)] == [0, 1, 1]
    _assert_same_file(tmp_path / "m.npz", tmp_path / "one.npz")


def test_a_deleted_part_is_redone_and_the_others_untouched(tiny_root, weight, images, one_process, tmp_path,
                                                           monkeypatch, capsys):
    parts = tmp_path / "parts"
    argv = _argv(tiny_root, weight, images, parts, "--merge", tmp_path / "m.npz")
    assert _run_ranks(monkeypatch, argv, 2) == [0, 0]
    p0, p1 = parts / part_name(0, 2), parts / part_name(1, 2)
    before = {p: (os.stat(p).st_mtime_ns, p.read_bytes()) for p in (p0, p1)}
    os.remove(p1)
    capsys.readouterr()
    assert _run_ranks(monkeypatch, argv, 2) == [0, 0]
    out = capsys.readouterr().out
    assert (os.stat(p0).st_mtime_ns, p0.read_bytes()) == before[p0]                  # kept as it was
    assert "kept the finished part" in out and "1 extracted now" in out
    assert os.stat(p1).st_mtime_ns != before[p1][0]                                   # written again ...
    redone, first = np.load(p1), np.load(_save_bytes(tmp_path / "first.npz", before[p1][1]))
    for k in ARRAYS:                                                                  # ... with the same content
        assert redone[k].tolist() == first[k].tolist(), k
    _assert_same_file(tmp_path / "m.npz", one_process)
    # everything finished: nothing is extracted again
    now = [os.stat(p).st_mtime_ns for p in (p0, p1)]
    capsys.readouterr()
    assert _run_ranks(monkeypatch, argv, 2) == [0, 0]
    assert "all finished before" in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in (p0, p1)] == now


def test_a_part_whose_images_changed_is_extracted_again(tiny_root, weight, images, tmp_path, monkeypatch, capsys):
    """An image replaced under the same name (another size or modification time): its part is
    extracted again, the other kept, and the merged file equals a fresh extraction of the folder."""
    folder = tmp_path / "gallery"
    shutil.copytree(images, folder)
    parts, merged = tmp_path / "parts", tmp_path / "m.npz"
    argv = _argv(tiny_root, weight, folder, parts, "--merge", merged)
    assert _run_ranks(monkeypatch, argv, 2) == [0, 0]
    p0, p1 = parts / part_name(0, 2), parts / part_name(1, 2)
    kept = (os.stat(p0).st_mtime_ns, p0.read_bytes())
    second = FeatureSet.load(str(p1), allow_empty=True).paths
    changed, donor = folder / second[0], folder / second[-1]     # rank 1's first image gets another's pixels
    shutil.copy(donor, changed)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10 ** 9))
    capsys.readouterr()
    assert _run_ranks(monkeypatch, argv, 2) == [0, 0]
    out = capsys.readouterr().out
    assert "images changed since it was extracted" in out and "1 extracted now" in out
    assert (os.stat(p0).st_mtime_ns, p0.read_bytes()) == kept
    fresh = tmp_path / "fresh.npz"
    assert extract_tool.main(_argv(tiny_root, weight, folder, fresh)) == 0
    _assert_same_file(merged, fresh)
    ref = FeatureSet.load(str(fresh))
    i, j = ref.paths.index(second[0]), ref.paths.index(second[-1])
    assert np.abs(ref.features[i] - ref.features[j]).max() <= 1e-6        # the replaced image's new features


def _save_bytes(path, data):
    path.write_bytes(data)
    return path


def test_an_interrupted_run_leaves_no_half_written_part(tiny_root, weight, images, tmp_path, monkeypatch, capsys):
    parts = tmp_path / "parts"
    argv = _argv(tiny_root, weight, images, parts)

    def stop_while_encoding(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(folder_features, "encode_batch", stop_while_encoding)
        assert _run_ranks(monkeypatch, argv, 2, ranks=[0]) == [130]
    assert "finished parts" in capsys.readouterr().err
    assert os.listdir(parts) == []
    # killed while writing: the temporary file is removed, the part never appears
    real_savez = np.savez

    def half_then_interrupt(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(np, "savez", half_then_interrupt)
        assert _run_ranks(monkeypatch, argv, 2, ranks=[1]) == [130]
    assert np.savez is real_savez and os.listdir(parts) == []
    # what a SIGKILL mid-write leaves (a temporary) is no part: removed at the next start
    (parts / f"{TMP_PREFIX}x{TMP_SUFFIX}").write_bytes(b"half")
    assert _run_ranks(monkeypatch, argv, 2) == [0, 0]
    assert sorted(os.listdir(parts)) == [part_name(0, 2), part_name(1, 2)]


def test_a_part_of_another_run_is_refused(tiny_root, weight, images, tmp_path, monkeypatch, capsys):
    parts = tmp_path / "parts"
    assert _run_ranks(monkeypatch, _argv(tiny_root, weight, images, parts), 2) == [0, 0]
    capsys.readouterr()
    # another number of processes over the folder
    assert _run_ranks(monkeypatch, _argv(tiny_root, weight, images, parts), 3, ranks=[0]) == [2]
    one_line_error(capsys, parts, "2 processes", "runs 3")
    # the same weights at another path are the same model (the part is kept) ...
    moved = tmp_path / "moved.pth"
    shutil.copy(weight, moved)
    assert _run_ranks(monkeypatch, _argv(tiny_root, moved, images, parts), 2, ranks=[0]) == [0]
    assert "kept the finished part" in capsys.readouterr().out
    # ... other weights are not
    sd = torch.load(weight)
    key = next(k for k in sd if sd[k].is_floating_point())
    sd[key] = sd[key] + 1
    torch.save(sd, tmp_path / "other.pth")
    assert _run_ranks(monkeypatch, _argv(tiny_root, tmp_path / "other.pth", images, parts), 2, ranks=[0]) == [2]
    one_line_error(capsys, part_name(0, 2), "sha256")
    # another image list (one image more)
    more = tmp_path / "more"
    shutil.copytree(images, more)
    shutil.copy(os.path.join(images, "day0", sorted(os.listdir(os.path.join(images, "day0")))[0]),
                more / "day0" / "0003_c2s1_000001_01.jpg")
    assert _run_ranks(monkeypatch, _argv(tiny_root, weight, more, parts), 2) == [2, 2]
    one_line_error(capsys, part_name(0, 2), "another image list")      # said once, by rank 0
    # a single .npz as the output of several processes
    assert _run_ranks(monkeypatch, _argv(tiny_root, weight, images, tmp_path / "f.npz"), 2, ranks=[0]) == [2]
    one_line_error(capsys, "f.npz", "folder", "--merge")


def test_a_merge_of_no_folder_or_into_a_folder_is_one_clear_line(tmp_path, capsys):
    assert extract_tool.main(["--out", str(tmp_path / "gone"), "--merge", str(tmp_path / "m.npz")]) == 2
    one_line_error(capsys, "--out", tmp_path / "gone", "no such folder of parts")
    (tmp_path / "m").mkdir()
    assert extract_tool.main(["--out", str(tmp_path), "--merge", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "--merge", tmp_path / "m", "is a folder")


# ----------------------------------------------------------------------------- load_features
def _fs(n, width=4, root="/data", offset=0, **meta):
    feats = np.arange(n * width, dtype=np.float32).reshape(n, width) + offset
    return FeatureSet(feats, [f"{offset + i:04d}_c1s1_000001_01.jpg" for i in range(n)], np.arange(n) + offset,
                      np.zeros(n, np.int64), root, [], {"weight": "/w.pth", "feat_dim": width, **meta})


def _write_parts(folder, sets):
    world = len(sets)
    for r, fs in enumerate(sets):
        fs.meta = {**fs.meta, "shard": {"rank": r, "world": world, "start": 0, "stop": 0, "total": 9,
                                        "list_sha1": "abc"}}
        fs.save(str(folder / part_name(r, world)))


def test_load_features_concatenates_files_and_folders_in_order(tmp_path):
    d = tmp_path / "parts"
    _write_parts(d, [_fs(2), _fs(0, offset=2), _fs(3, offset=2)])
    _fs(1, offset=5).save(str(tmp_path / "more.npz"))
    fs = load_features([str(d), str(tmp_path / "more.npz")])
    assert fs.features[:, 0].tolist() == [0, 4, 2, 6, 10, 5]
    assert fs.pids.tolist() == [0, 1, 2, 3, 4, 5] and fs.paths[2] == "0002_c1s1_000001_01.jpg"
    assert fs.meta == {"weight": "/w.pth", "feat_dim": 4} and fs.root == "/data"
    # other folders: one common root, paths relative to it
    _fs(1, root="/data/b", offset=7).save(str(tmp_path / "b.npz"))
    fs = load_features([str(tmp_path / "more.npz"), str(tmp_path / "b.npz")])
    assert fs.root == "/data" and fs.paths == ["0005_c1s1_000001_01.jpg", "b/0007_c1s1_000001_01.jpg"]


def test_load_features_refusals(tmp_path):
    d = tmp_path / "parts"
    _write_parts(d, [_fs(2), _fs(2, offset=2), _fs(2, offset=4)])
    os.remove(d / part_name(1, 3))
    with pytest.raises(UserError, match=r"1 of 3 parts missing: part-00001-of-00003\.npz"):
        load_features([str(d)])
    _write_parts(d, [_fs(2), _fs(2, offset=2)])        # beside the 2 remaining parts of 3
    with pytest.raises(UserError, match="several extractions"):
        load_features([str(d)])
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="holds no feature parts"):
        load_features([str(tmp_path / "none")])
    _fs(2).save(str(tmp_path / "a.npz"))
    _fs(2, width=8).save(str(tmp_path / "wide.npz"))
    with pytest.raises(UserError, match=r"a\.npz and .*wide\.npz have features of different widths \(4 vs 8\)"):
        load_features([str(tmp_path / "a.npz"), str(tmp_path / "wide.npz")])
    _fs(2, size_test=[256, 128]).save(str(tmp_path / "s1.npz"))
    _fs(2, size_test=[384, 128]).save(str(tmp_path / "s2.npz"))
    with pytest.raises(UserError, match=r"s1\.npz and .*s2\.npz were extracted differently \(size_test: "
                                        r"\[256, 128\] vs \[384, 128\]\)"):
        load_features([str(tmp_path / "s1.npz"), str(tmp_path / "s2.npz")])
    # the same checkpoint content at two paths is the same model; other content is not
    _fs(2, sha256="aa").save(str(tmp_path / "h1.npz"))
    _fs(2, sha256="aa", weight="/elsewhere/w.pth").save(str(tmp_path / "h2.npz"))
    _fs(2, sha256="bb").save(str(tmp_path / "h3.npz"))
    assert len(load_features([str(tmp_path / "h1.npz"), str(tmp_path / "h2.npz")]).paths) == 4
    with pytest.raises(UserError, match="sha256: 'aa' vs 'bb'"):
        load_features([str(tmp_path / "h1.npz"), str(tmp_path / "h3.npz")])
    e = tmp_path / "empty"
    _write_parts(e, [_fs(0), _fs(0)])
    with pytest.raises(UserError, match="no features"):
        load_features([str(e)])
    with pytest.raises(UserError, match="no feature files"):
        load_features([])
    # a part renamed to another rank's place
    r = tmp_path / "renamed"
    _write_parts(r, [_fs(1), _fs(1, offset=1)])
    os.replace(r / part_name(0, 2), r / "tmp.npz")
    os.replace(r / part_name(1, 2), r / part_name(0, 2))
    os.replace(r / "tmp.npz", r / part_name(1, 2))
    with pytest.raises(UserError, match="holds the part 1 of 2, not 0 of 2"):
        load_features([str(r)])


# ----------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_equal_one(tiny_root, weight, images, one_process, tmp_path):
    """2 gloo processes under torchrun write 2 parts and merge them into the one-process file.
    In the fast tier (about 7 s): the real multi-process path is what sharded extraction is for."""
    parts, merged = tmp_path / "parts", tmp_path / "merged.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tools", "extract_features.py"),
           *_argv(tiny_root, weight, images, parts, "--merge", merged)]
    env = dict(os.environ, OMP_NUM_THREADS="1", SVLLREID_PROGRESS="off", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(parts)) == [part_name(0, 2), part_name(1, 2)]
    for r in (0, 1):
        assert f"rank {r}/2: " in proc.stdout and "images/s" in proc.stdout
    _assert_same_file(merged, one_process)


# ----------------------------------------------------------------------------- the launcher
def test_the_launcher_refuses_before_any_process_starts(tiny_root, weight, images, tmp_path, monkeypatch, capsys):
    """tools/launch.py runs extract_features.check_launch once: what the command line and the
    finished parts show (a file as --out, another number of processes, another checkpoint,
    TEST.NECK_FEAT or image list) is one line, and no process is started."""
    parts = tmp_path / "parts"
    assert _run_ranks(monkeypatch, _argv(tiny_root, weight, images, parts), 2) == [0, 0]
    started = []
    monkeypatch.setattr(launch.torchrun, "run", started.append)

    def launched(w, imgs, out, *opts, world=2):
        return launch.main(["--standalone", "--nproc_per_node", str(world),
                            os.path.join(ROOT, "tools", "extract_features.py"), *_argv(tiny_root, w, imgs, out), *opts])
    sd = torch.load(weight)
    key = next(k for k in sd if sd[k].is_floating_point())
    sd[key] = sd[key] + 1
    torch.save(sd, tmp_path / "other.pth")
    more = tmp_path / "more"
    shutil.copytree(images, more)
    shutil.copy(os.path.join(images, "day0", sorted(os.listdir(os.path.join(images, "day0")))[0]),
                more / "day0" / "0003_c2s1_000001_01.jpg")
    capsys.readouterr()
    for args, kw, needles in [((weight, images, tmp_path / "f.npz"), {}, ["f.npz", "folder", "--merge"]),
                              ((weight, images, parts), {"world": 3}, [parts, "2 processes", "runs 3"]),
                              ((tmp_path / "other.pth", images, parts), {}, [part_name(0, 2), "sha256"]),
                              ((weight, images, parts, "TEST.NECK_FEAT", "after"), {}, ["neck_feat"]),
                              ((weight, more, parts), {}, [part_name(0, 2), "another image list"])]:
        assert launched(*args, **kw) == 2
        one_line_error(capsys, *needles)
    assert started == []
    assert launched(weight, images, parts) == 0 and len(started) == 1        # all is well: torchrun starts them


def test_the_launcher_refuses_sizes_and_scripts_torchrun_cannot_start(monkeypatch, capsys, tmp_path):
    """A process count or machine count torchrun cannot use was an AssertionError or ValueError
    traceback from inside torchrun; a missing script was Python's "can't open file" once per process;
    train_svllreid.py without MODEL.DIST_TRAIN started N trainings into one OUTPUT_DIR (the second
    one "in use by another run", its sibling), and test_svllreid.py N evaluations. Each is one line
    now, and nothing starts."""
    started = []
    monkeypatch.setattr(launch.torchrun, "run", started.append)
    script = os.path.join(ROOT, "tools", "plot_curves.py")
    for argv, needles in [(["--nproc_per_node", "0", script], ["--nproc_per_node 0", "1 or more"]),
                          (["--nproc_per_node", "-1", script], ["--nproc_per_node -1", "1 or more"]),
                          (["--nproc_per_node", "banana", script], ["--nproc_per_node banana", "not a process count"]),
                          (["--nnodes", "0", script], ["--nnodes 0", "MIN:MAX"]),
                          (["--nnodes", "2:1", script], ["--nnodes 2:1", "MIN:MAX"]),
                          (["--nproc_per_node", "2", str(tmp_path / "nope.py")], ["no such script", "nope.py"]),
                          (["--nproc_per_node", "2", os.path.join(ROOT, "train_svllreid.py"), "--config_file", DEMO,
                            "OUTPUT_DIR", str(tmp_path / "run")], ["2 processes", "MODEL.DIST_TRAIN True"]),
                          (["--nproc_per_node", "2", os.path.join(ROOT, "test_svllreid.py"), "--config_file", DEMO,
                            "TEST.WEIGHT", str(tmp_path / "w.pth")], ["evaluates in one process", "2 were started"])]:
        assert launch.main(argv) == 2, argv
        one_line_error(capsys, *needles)
    assert started == [] and not os.path.exists(tmp_path / "run")
    assert launch.main(["--nproc_per_node", "2", os.path.join(ROOT, "train_svllreid.py"), "--config_file", DEMO,
                        "MODEL.DIST_TRAIN", "True", "OUTPUT_DIR", str(tmp_path / "run")]) == 0 and len(started) == 1


def test_the_launcher_exits_with_the_processes_code_and_adds_nothing(monkeypatch, capsys):
    """A process that said why (2, 130, 143) ends the job with its code and no torchrun report; a
    crash or a signal gets one line naming the rank; Ctrl-C to the launcher gives 130."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing(exc):
        def run(args):
            raise exc
        return run
    argv = ["--nproc_per_node", "2", "-m", "not_a_project_module"]
    for code, expected, line in [(2, 2, None), (130, 130, None), (143, 143, None), (1, 1, "rank 1 (pid 7) exited "
                                 "with code 1"), (-9, 137, "rank 1 (pid 7) was stopped by SIGKILL")]:
        failure = ProcessFailure(local_rank=1, pid=7, exitcode=code, error_file="<N/A>")
        monkeypatch.setattr(launch.torchrun, "run", failing(ChildFailedError("x.py", {1: failure})))
        assert launch.main(argv) == expected
        err = capsys.readouterr().err
        assert err.strip() == ("" if line is None else f"error: {line}; its output above says why"
                               if code > 0 else f"error: {line}")
    monkeypatch.setattr(launch.torchrun, "run", failing(SignalException("got signal", signal.SIGINT)))
    assert launch.main(argv) == 130 and capsys.readouterr().err == ""
    monkeypatch.setattr(launch.torchrun, "run", failing(SignalException("got signal", signal.SIGTERM)))
    assert launch.main(argv) == 143


@pytest.mark.slow
def test_the_launcher_under_two_processes_says_a_refusal_once(tiny_root, images, tmp_path):
    """Two gloo processes that both refuse (a checkpoint that is not there): rank 0's one line,
    exit code 2, and nothing of torchrun's (plain torchrun adds its ChildFailedError report)."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "launch.py"), "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tools", "extract_features.py"),
           *_argv(tiny_root, tmp_path / "gone.pth", images, tmp_path / "parts")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'gone.pth'}"
    assert "ChildFailedError" not in proc.stdout + proc.stderr and "Traceback" not in proc.stdout
