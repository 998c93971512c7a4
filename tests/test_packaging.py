"""The package definition: installed as a package (no sys.path edits anywhere), the optional
extras apart from the core dependencies, and a missing extra reported in one line."""
import ast
import glob
import importlib.metadata
import json
import logging
import os
import sys
import tomllib

import pytest

from utils.errors import UserError, import_extra
from utils.record import METRICS_FILE, write_curves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_files():
    skip = (os.path.join(ROOT, ".venv"), os.path.join(ROOT, "output"), os.path.join(ROOT, "data"))
    return [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True) if not p.startswith(skip)]


def test_no_module_edits_sys_path():
    edits = []
    for path in _project_files():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                edits.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not edits, edits


def test_installed_as_the_package_pyproject_defines():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert importlib.metadata.version("svllreid") == meta["project"]["version"]
    for name in ("config", "datasets", "model", "processor", "loss", "solver", "utils", "tools"):
        mod = importlib.import_module(name)
        assert os.path.dirname(mod.__file__) == os.path.join(ROOT, name)


def _pins(name):
    with open(os.path.join(ROOT, name)) as f:
        return {ln.split("==")[0].strip().lower() for ln in f if ln.strip() and not ln.startswith(("#", "-r"))}


def test_extras_are_apart_from_the_core():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dyn = tomllib.load(f)["tool"]["setuptools"]["dynamic"]
    assert dyn["dependencies"]["file"] == ["requirements.txt"]
    extras = {k: v["file"] for k, v in dyn["optional-dependencies"].items()}
    assert extras == {"export": ["requirements-export.txt"], "record": ["requirements-record.txt"]}
    core, export, record = _pins("requirements.txt"), _pins("requirements-export.txt"), _pins("requirements-record.txt")
    assert {"onnx", "onnxruntime", "onnxscript"} == export and {"tensorboard", "matplotlib"} == record
    assert not (core & (export | record)) and {"torch", "torchvision", "timm"} <= core


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # as if not installed
    with pytest.raises(UserError) as e:
        import_extra("onnxruntime", "export")
    assert "onnxruntime is not installed" in str(e.value) and ".[export]" in str(e.value)


def test_training_ends_without_its_picture_when_matplotlib_is_missing(tmp_path, monkeypatch, caplog):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"stage": 2, "epoch": 1, "kind": "epoch", "loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with caplog.at_level(logging.WARNING, logger="svllreid"):
        assert write_curves(str(tmp_path)) is None
    assert "curves.png not drawn" in caplog.text and ".[record]" in caplog.text
    assert not (tmp_path / "curves.png").exists()
