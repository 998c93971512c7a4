"""Synthetic ReID set generator: determinism, Market layout, identity/camera structure."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from datasets import build_dataset
from datasets.synthetic import (
    SyntheticSpec,
    _rng,
    ensure_synthetic,
    generate_synthetic,
    make_camera,
    make_identity,
    pixel_baseline,
    render,
)

SMALL = dict(num_train_ids=5, num_test_ids=4, num_cams=3, images_per_cam=2,
             num_distractors=3, num_junk=2, height=48, width=24)


def tree_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        for f in sorted(os.listdir(os.path.join(root, sub))):
            with open(os.path.join(root, sub, f), "rb") as fh:
                out[f"{sub}/{f}"] = fh.read()
    return out


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_synthetic(a, seed=3, **SMALL)
    generate_synthetic(b, seed=3, **SMALL)
    generate_synthetic(c, seed=4, **SMALL)
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert ta == tb and len(ta) > 0
    with open(os.path.join(a, "synthetic.json")) as f1, open(os.path.join(b, "synthetic.json")) as f2:
        assert f1.read() == f2.read()
    assert set(ta) != set(tc) or any(ta[k] != tc[k] for k in ta)


def test_layout_parses_with_folder_and_market_parsers(tmp_path):
    root = str(tmp_path / "syn")
    counts = generate_synthetic(root, seed=0, **SMALL)
    ds = build_dataset("folder", root)
    assert ds.num_train_pids == 5 and ds.num_train_imgs == counts["bounding_box_train"]
    assert ds.num_train_cams == 3
    assert len(ds.query) == counts["query"]
    assert len(ds.gallery) == counts["bounding_box_test"] - SMALL["num_junk"]  # junk skipped
    assert sum(s[1] == 0 for s in ds.gallery) == SMALL["num_distractors"]
    junk = [f for f in os.listdir(os.path.join(root, "bounding_box_test")) if f.startswith("-1_")]
    assert len(junk) == SMALL["num_junk"]
    # train and test identities are disjoint; every query has a gallery match in another camera
    train_pids = {int(os.path.basename(s[0])[:4]) for s in ds.train}
    assert not train_pids & {s[1] for s in ds.query}
    for _, pid, cam, _ in ds.query:
        assert any(g[1] == pid and g[2] != cam for g in ds.gallery)
    # the same folder laid out as Market-1501 parses identically (1-based cameras)
    shutil.copytree(root, str(tmp_path / "m" / "Market-1501-v15.09.15"))
    market = build_dataset("market1501", str(tmp_path / "m"))
    assert [s[1:] for s in market.train] == [s[1:] for s in ds.train]
    assert [s[1:] for s in market.gallery] == [s[1:] for s in ds.gallery]


def test_identities_differ_and_cameras_change_appearance():
    cam = make_camera(_rng(0, 2, 1))
    other_cam = make_camera(_rng(0, 2, 2))
    ids = [make_identity(_rng(0, 1, p)) for p in range(1, 4)]

    def img(ident, camera, k=0):
        return render(ident, camera, _rng(0, 3, 9, 9, k), 128, 64).astype(np.float32)

    base = img(ids[0], cam)
    assert not np.array_equal(base, img(ids[0], cam, k=1))  # per-image jitter
    for other in ids[1:]:
        assert np.abs(base - img(other, cam)).mean() > 3.0
    assert np.abs(base - img(ids[0], other_cam)).mean() > 10.0
    attrs = [(tuple(i.top.round()), i.pattern, i.bag, round(i.height, 3)) for i in ids]
    assert len(set(attrs)) == 3


def test_refuses_to_overwrite_and_ensure_reuses(tmp_path):
    root = str(tmp_path / "syn")
    ensure_synthetic(root, seed=0, **SMALL)
    stamp = os.path.getmtime(os.path.join(root, "synthetic.json"))
    ensure_synthetic(root, seed=0, **SMALL)  # same parameters: untouched
    assert os.path.getmtime(os.path.join(root, "synthetic.json")) == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic(root, seed=1, **SMALL)
    before = set(tree_bytes(root))
    generate_synthetic(root, seed=1, overwrite=True, **SMALL)
    fresh = str(tmp_path / "fresh")
    generate_synthetic(fresh, seed=1, **SMALL)
    assert tree_bytes(root) == tree_bytes(fresh)  # no stale files of the old set remain
    assert before != set(tree_bytes(root))


def test_cli_writes_a_set(tmp_path, capsys):
    from tools import make_synthetic
    out = str(tmp_path / "cli")
    rc = make_synthetic.main(["--out", out, "--num-ids", "3", "--num-test-ids", "2",
                              "--num-cams", "2", "--images-per-cam", "2", "--height", "32",
                              "--width", "16", "--seed", "5"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert build_dataset("folder", out).num_train_pids == 3
    assert make_synthetic.main(["--out", out]) == 1  # exists, no --overwrite


def test_overwrite_never_deletes_images_the_generator_did_not_write(tmp_path, capsys, monkeypatch):
    """--overwrite on a real Market folder deleted its .jpg files: only a folder holding the
    generator's synthetic.json is replaced; an interrupted set (marked from its first image) is."""
    from tools import make_synthetic
    real = tmp_path / "Market"
    generate_synthetic(str(real), seed=0, **SMALL)
    os.remove(real / "synthetic.json")                      # a Market-layout folder of someone else's images
    before = tree_bytes(str(real))
    argv = ["--out", str(real), "--overwrite", "--num-ids", "3", "--num-test-ids", "2", "--height", "32",
            "--width", "16"]
    assert make_synthetic.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(real) in err and "synthetic.json" in err
    assert tree_bytes(str(real)) == before
    # a set cut short by a kill: its marker says so, and --overwrite writes it again
    import datasets.synthetic as synthetic_mod
    ours, drawn = tmp_path / "cut", []

    def die_after_two(*args, **kwargs):
        drawn.append(1)
        if len(drawn) > 2:
            raise KeyboardInterrupt
        return render(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(synthetic_mod, "render", die_after_two)
        with pytest.raises(KeyboardInterrupt):
            generate_synthetic(str(ours), seed=0, **SMALL)
    assert os.path.isfile(ours / "synthetic.json")
    ensure_synthetic(str(ours), seed=0, **SMALL)           # incomplete: written again, not taken as done
    generate_synthetic(str(tmp_path / "whole"), seed=0, **SMALL)
    assert tree_bytes(str(ours)) == tree_bytes(str(tmp_path / "whole"))


def test_pixel_baseline_and_oracle(tmp_path):
    root = str(tmp_path / "syn")
    generate_synthetic(root, seed=0, **SMALL)
    r = pixel_baseline(root, size=(8, 4))
    assert r["oracle_mAP"] == pytest.approx(1.0) and r["oracle_rank1"] == pytest.approx(1.0)
    assert 0.0 < r["pixel_mAP"] < 1.0


def test_spec_validation():
    with pytest.raises(ValueError, match="num_cams"):
        SyntheticSpec(num_cams=1)
