"""The code layout keeps its order: every import runs downward, ``utils/`` at the ground.

Rooms are the top-level packages, folders and modules of the project. Each has a level
(:data:`ORDER`); a module may import only rooms of a lower level (and its own room). The
check reads every ``.py`` file with :mod:`ast`, so imports inside functions count too.
Run with ``-s`` to see the figures (rooms, arrows, back-arrows, the biggest room's share).
"""
from __future__ import annotations

import ast
import inspect
import os
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The order of the rooms, ground first. Rooms of one level are siblings: they do not import
# each other.
ORDER: dict[str, int] = {
    "utils": 0,                                  # helpers that know nothing of the project
    "config": 1,                                 # the config, its checks and the resume rules
    "datasets": 2, "loss": 2, "solver": 2,       # data, objectives, optimisers
    "model": 3,                                  # CLIP backbone, prompts, heads, loading
    "processor": 4,                              # training loops, inference, folders, ONNX
    "train_svllreid": 5, "test_svllreid": 5,     # entry points
    "tools": 6,                                  # tools on top of the entry points
    "tests": 7,
    "bench": 8,                                  # benchmarks time the code against tests/reference.py
}
SKIP_DIRS = {".venv", ".git", "__pycache__", ".ruff_cache", ".pytest_cache", "output", "outputs", "data", "logs"}


def _python_files() -> list[str]:
    """Every .py file of the project (relative paths), without the virtual environment."""
    out = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith(".py")]
    return sorted(out)


def _room(rel: str) -> str:
    return rel.split(os.sep)[0].removesuffix(".py")


def _imported_modules(rel: str, tree: ast.AST) -> list[tuple[str, int]]:
    """Absolute names of the modules ``rel`` imports (relative imports resolved), with line numbers."""
    package = os.path.dirname(rel).split(os.sep) if os.path.dirname(rel) else []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                out.append((".".join([*base, node.module] if node.module else base), node.lineno))
            else:
                out.append((node.module or "", node.lineno))
    return out


@pytest.fixture(scope="module")
def imports() -> list[tuple[str, str, str, int]]:
    """(importing room, imported room, file, line) for every import of another project room."""
    files = _python_files()
    rooms = {_room(f) for f in files}
    out = []
    for rel in files:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), rel)
        for name, line in _imported_modules(rel, tree):
            target = name.split(".")[0]
            if target in rooms and target != _room(rel):
                out.append((_room(rel), target, rel, line))
    return out


def test_every_room_has_a_place_in_the_order():
    assert {_room(f) for f in _python_files()} == set(ORDER), "a new top-level room needs a level in ORDER"


def test_utils_imports_nothing_of_the_project(imports):
    upward = [f"{rel}:{line} imports {target}" for room, target, rel, line in imports if room == "utils"]
    assert upward == [], "utils/ must stay at the ground:\n" + "\n".join(upward)


def test_every_import_runs_downward(imports):
    back = [f"{rel}:{line}: {room} (level {ORDER[room]}) imports {target} (level {ORDER[target]})"
            for room, target, rel, line in imports if ORDER[target] >= ORDER[room]]
    assert back == [], "imports that run back up (or sideways) the order of the rooms:\n" + "\n".join(back)


def test_layout_figures(imports):
    """The figures of the layout (printed with ``-s``); the two that must be 0 are asserted."""
    files = _python_files()
    lines: Counter[str] = Counter()
    for rel in files:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
            lines[_room(rel)] += sum(1 for _ in fh)
    code = Counter({r: n for r, n in lines.items() if r != "tests"})
    arrows = {(a, b) for a, b, _, _ in imports}
    back = {(a, b) for a, b in arrows if ORDER[b] >= ORDER[a]}
    biggest, n = code.most_common(1)[0]
    print(f"\nrooms: {len(lines)}; import arrows between rooms: {len(arrows)}; back-arrows: {len(back)}; "
          f"utils imports of the project: {sum(a == 'utils' for a, _ in arrows)}; biggest room (tests aside): "
          f"{biggest} {n}/{sum(code.values())} lines ({100 * n / sum(code.values()):.0f}%)")
    assert not back and not any(a == "utils" for a, _ in arrows)


def test_the_check_sees_lazy_and_relative_imports():
    """A lazy import inside a function and a relative import are both found (the check is not blind)."""
    src = "def f():\n    from processor.common import autocast\nfrom .fileio import atomic_write\n"
    found = [name for name, _ in _imported_modules(os.path.join("utils", "x.py"), ast.parse(src))]
    assert sorted(found) == ["processor.common", "utils.fileio"]


# ----------------------------------------------------------------------------- one name, one meaning
def test_user_errors_are_one_family_caught_by_the_command_line():
    """utils.cli knows only the UserError base; every room's user error derives from it."""
    from config import ConfigError
    from datasets.bases import DatasetError
    from datasets.synthetic import SyntheticSpecError
    from processor.position import NonFiniteLossError
    from utils import cli
    from utils.checkpoint import CheckpointError, CheckpointMismatchError
    from utils.errors import UserError
    from utils.run_dir import RunError
    assert cli.USER_ERRORS == (UserError, OSError)
    for cls in (ConfigError, DatasetError, SyntheticSpecError, CheckpointError, CheckpointMismatchError, RunError,
                NonFiniteLossError):
        assert issubclass(cls, cli.USER_ERRORS), cls
    # the classes they were before stay their bases (callers catching ValueError/RuntimeError still do)
    assert issubclass(ConfigError, ValueError) and issubclass(DatasetError, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(RunError, RuntimeError)


def test_one_yes_no_parser():
    import config
    from utils import metrics, yesno
    assert config.is_yes is yesno.is_yes and metrics.is_yes is yesno.is_yes
    assert not hasattr(metrics, "_is_yes")
    words = (True, "yes", "ON", "true", False, "no", "off", "False")
    assert [yesno.is_yes(v) for v in words] == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="yes/no"):
        yesno.is_yes("maybe")


def test_config_names_match_what_the_lower_rooms_implement():
    import config
    from datasets.factory import DATASETS
    from solver import make_optimizer
    assert tuple(DATASETS) == config.DATASET_NAMES
    assert config.CHOICES["SOLVER.STAGE1.OPTIMIZER_NAME"] == config.OPTIMIZERS == make_optimizer.OPTIMIZERS
    assert config.CHOICES["SOLVER.STAGE2.WARMUP_METHOD"] == config.WARMUP_METHODS


def test_one_image_lister_behind_the_three_callers(tmp_path):
    """The dataset folders, the folders of the tools and the ONNX check list images the same way."""
    from datasets.bases import DatasetError, dataset_image_names
    from processor.folder_inference import list_image_files
    from processor.onnx_export import image_paths
    from utils.images import INPUT_EXTENSIONS, list_images
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "notes.txt", "c.tif", "sub/d.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert list_images(str(tmp_path)) == ["a.png", "b.JPG"]
    assert dataset_image_names(str(tmp_path)) == ["a.png", "b.JPG"]
    assert image_paths([str(tmp_path)]) == [str(tmp_path / "a.png"), str(tmp_path / "b.JPG")]
    assert list_image_files(str(tmp_path)) == list_images(str(tmp_path), recursive=True, extensions=INPUT_EXTENSIONS) \
        == ["a.png", "b.JPG", "c.tif", os.path.join("sub", "d.jpg")]
    nested = tmp_path / "nested"     # a nested layout is refused by name, as before
    (nested / "0001").mkdir(parents=True)
    (nested / "0001" / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="sub-folders"):
        dataset_image_names(str(nested))


def test_merged_and_renamed_names():
    """One load_model (folder inference); distinct names for the JSON beside weights and ONNX metadata."""
    from processor import folder_inference, onnx_export
    from utils import checkpoint
    for gone in ("load_model", "read_metadata", "test_dataset", "_state_dict_of", "list_images"):
        obj = getattr(onnx_export, gone, None)      # gone, or only the shared one imported
        assert obj is None or obj.__module__ != onnx_export.__name__, gone
    assert callable(folder_inference.load_model) and callable(onnx_export.eval_dataset)
    assert callable(onnx_export.read_onnx_metadata) and callable(checkpoint.read_metadata)


def test_run_position_resets_without_re_running_init():
    from processor.position import POSITION, RunPosition
    saved = (POSITION.stage, POSITION.epoch, POSITION.saved)
    try:
        POSITION.stage, POSITION.epoch, POSITION.saved = 2, 3, (2, 2)
        POSITION.reset()
        assert (POSITION.stage, POSITION.epoch, POSITION.saved) == (None, None, None)
        assert POSITION.describe() == RunPosition().describe()
    finally:
        POSITION.stage, POSITION.epoch, POSITION.saved = saved


def test_evaluation_returns_its_features_instead_of_filling_a_dict(monkeypatch):
    import torch

    from config import get_default_config
    from processor import Evaluation, do_inference, evaluate_loader, inference
    feats = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    pids, cams = torch.tensor([1, 2, 1, 2, 3, 1]), torch.tensor([0, 0, 1, 1, 1, 0])
    monkeypatch.setattr(inference, "extract_features", lambda *a, **k: (feats, pids, cams))

    class Loader:
        dataset = type("D", (), {"samples": [("p", 1, 0, 0)] * 6})()
    cfg = get_default_config()
    ev = evaluate_loader(cfg, None, Loader(), 2, torch.device("cpu"))
    assert isinstance(ev, Evaluation) and ev.feats is feats and ev.num_query == 2 and len(ev.samples) == 6
    assert do_inference(cfg, None, Loader(), 2, torch.device("cpu")) == ev.results
    assert "keep" not in inspect.signature(do_inference).parameters


def test_plot_curves_starts_without_the_heavy_rooms():
    """utils/ at the ground pays off: plotting a finished run's curves loads no torch, numpy or model
    (its imports are too quick for a Ctrl-C to land in them, tests/test_edges_startup.py)."""
    import subprocess
    import sys
    code = ("import runpy, sys\nsys.argv = ['tools/plot_curves.py', '--help']\n"
            "try:\n    runpy.run_path('tools/plot_curves.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'config', 'datasets', 'model',"
            " 'processor'}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
