"""The code layout keeps its order: every import runs downward, ``utils/`` at the ground.

Rooms are the top-level packages and modules of the project. Their order is a contract of
import-linter in pyproject.toml (``[tool.importlinter]``), which ``make lint`` checks
(``lint-imports``), imports inside functions included. What import-linter cannot express is checked
here: that every room has a place in the contract, and the imports of the top-level modules (the
entry scripts, ``setup.py``), which it does not analyse.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".venv", ".git", "__pycache__", ".ruff_cache", ".pytest_cache", "output", "outputs", "data", "logs"}
SCRIPTS = ("train_svllreid", "test_svllreid")      # the entry scripts: right below tools
# The top-level modules (import-linter reads packages only) and the layer right above the rooms each may import.
MODULES = {"train_svllreid": "tools", "test_svllreid": "tools", "setup": None}     # setup: nothing of the project


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


def _linter() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]


def _contract(cid: str) -> dict:
    return next(c for c in _linter()["contracts"] if c["id"] == cid)


def _layers() -> list[set[str]]:
    """The rooms of each layer of the layers contract, top first."""
    return [{r.strip() for r in re.split(r"[|:]", layer)} for layer in _contract("layers")["layers"]]


def _below(layer: str) -> set[str]:
    """The rooms of the layers below the one holding ``layer``."""
    layers = _layers()
    i = next(i for i, rooms in enumerate(layers) if layer in rooms)
    return set().union(*layers[i + 1:])


def test_every_room_has_a_place_in_the_contract():
    """A new top-level room must be placed in the order (root_packages and a layer), else nothing checks it."""
    linter = _linter()
    layered = set().union(*_layers())
    assert set(linter["root_packages"]) == layered, "root_packages and the layers name different rooms"
    rooms = {_room(f) for f in _python_files()}
    assert rooms == layered | set(MODULES), "a new top-level room needs a layer in pyproject.toml [tool.importlinter]"


def test_no_room_below_the_scripts_imports_them():
    """The second contract forbids the scripts to every room below them (a new one there is named too)."""
    scripts = _contract("scripts")
    assert set(scripts["forbidden_modules"]) == set(SCRIPTS)
    assert set(scripts["source_modules"]) == _below("tools")


def test_top_level_modules_import_only_the_rooms_below_them():
    """What import-linter does not see: the entry scripts import only rooms below tools; setup.py none."""
    rooms = {_room(f) for f in _python_files()}
    for module, above in MODULES.items():
        rel = module + ".py"
        with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), rel)
        allowed = _below(above) if above else set()
        wrong = [f"{rel}:{line} imports {name}" for name, line in _imported_modules(rel, tree)
                 if name.split(".")[0] in rooms - allowed]
        assert not wrong, wrong


@pytest.mark.slow
def test_the_contract_sees_lazy_imports(tmp_path):
    """lint-imports with the project's contracts passes on the project and fails on a copy whose utils
    imports processor inside a function, or whose model imports an entry script."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    for name in set(_linter()["root_packages"]):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", *(m + ".py" for m in MODULES)):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert check().returncode == 0
    with open(tmp_path / "utils" / "yesno.py", "a") as f:
        f.write("\n\ndef _probe():\n    from processor import progress  # noqa: F401\n")
    with open(tmp_path / "model" / "heads.py", "a") as f:
        f.write("\n\ndef _probe():\n    import train_svllreid  # noqa: F401\n")
    out = check()
    assert out.returncode != 0
    assert "utils is not allowed to import processor" in out.stdout
    assert "model is not allowed to import train_svllreid" in out.stdout


def test_processor_is_training_and_benchmark_evaluation_and_retrieval_its_own_room():
    """The model in use outside the benchmark (folder features, feature parts, the gallery index and its
    folder store, ONNX export) lives in retrieval/, above processor/, which keeps none of it."""
    processor = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "processor")) if f.endswith(".py")}
    retrieval = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "retrieval")) if f.endswith(".py")}
    assert {"features", "feature_parts", "index", "index_store", "export"} <= retrieval
    assert not processor & {"folder_inference", "feature_parts", "gallery_index", "onnx_export", "features",
                            "index", "index_store", "export"}
    assert _below("retrieval") >= {"processor", "model", "datasets", "utils"} and "retrieval" in _below("tools")
    from retrieval import index, index_store
    for name in ("load_index", "save_index", "write_index", "_Staging", "_recover", "_pid_alive", "_fsync"):
        assert hasattr(index_store, name) and not hasattr(index, name), name


# The telltales of a distance formula: the squared euclidean GEMM (alpha=-2), 1 - x.y in place, 2 x.y
# subtracted, the squared L2 of unit vectors halved, torch.cdist.
FORMULA = re.compile(r"alpha\s*=\s*-2|\.neg_\(\)\.add_\(1|-\s*2\s*\*\s*\(|2 - 2 cos|\bcdist\(")


def test_one_place_computes_distances():
    """utils/distance.py holds the distance formula; no other file of the product writes one (the published
    code in reference/ and the tests' own references are the yardsticks, not the product)."""
    product = [f for f in _python_files() if _room(f) not in ("reference", "tests", "bench")]
    found = [f"{f}:{n}" for f in product if f != os.path.join("utils", "distance.py")
             for n, line in enumerate(open(os.path.join(ROOT, f), encoding="utf-8"), 1)
             if FORMULA.search(line.split("#")[0])]
    assert not found, found
    with open(os.path.join(ROOT, "utils", "distance.py"), encoding="utf-8") as fh:
        assert FORMULA.search(fh.read())


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
    from utils import distance, metrics, yesno
    assert config.is_yes is yesno.is_yes and distance.is_yes is yesno.is_yes     # the distance settings' reader
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
    from retrieval.export import image_paths
    from retrieval.features import list_image_files
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
    from retrieval import export as onnx_export
    from retrieval import features as folder_features
    from utils import checkpoint
    for gone in ("load_model", "read_metadata", "test_dataset", "_state_dict_of", "list_images"):
        obj = getattr(onnx_export, gone, None)      # gone, or only the shared one imported
        assert obj is None or obj.__module__ != onnx_export.__name__, gone
    assert callable(folder_features.load_model) and callable(onnx_export.eval_dataset)
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
