"""The package definition: installed as a package (no sys.path edits anywhere), editable only,
dependency ranges pinned by constraints.txt, the optional extras apart from the core dependencies,
and a missing extra reported in one line (training and evaluation need none)."""
import ast
import glob
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import DEMO, tool_opts, train_argv
from utils.errors import EXTRAS, UserError, import_extra
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


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _pins() -> dict[str, str]:
    """{normalised name: version} of constraints.txt, the exact versions make installs."""
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            if line.split("#")[0].strip():
                req = Requirement(line.split("#")[0].strip())
                (spec,) = req.specifier
                assert spec.operator == "==", f"constraints.txt pins exact versions: {line.strip()}"
                pins[canonicalize_name(req.name)] = spec.version
    return pins


def _extras() -> dict[str, set[str]]:
    return {k: {canonicalize_name(Requirement(r).name) for r in v}
            for k, v in _pyproject()["project"]["optional-dependencies"].items()}


def test_python_and_build_requirements_say_what_is_true():
    meta = _pyproject()
    assert meta["project"]["requires-python"] == ">=3.11"     # numpy 2.4, scipy 1.17, tomllib, ruff py311
    (setuptools,) = meta["build-system"]["requires"]
    assert Requirement(setuptools).name == "setuptools" and str(Requirement(setuptools).specifier).startswith(">=")


def test_dependencies_are_ranges_that_admit_the_pinned_versions():
    """pyproject.toml states ranges; constraints.txt pins every one of them to a version inside its range,
    and that is the version installed here."""
    project, pins = _pyproject()["project"], _pins()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a range, not a pin"
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req.specifier}"
        assert importlib.metadata.version(req.name) == pins[name], req.name


def test_extras_are_apart_from_the_core_and_make_installs_every_one():
    core = {canonicalize_name(Requirement(r).name) for r in _pyproject()["project"]["dependencies"]}
    extras = _extras()
    assert extras == {"export": {"onnx", "onnxruntime", "onnxscript"}, "record": {"tensorboard", "matplotlib"},
                      "index": {"faiss-cpu"}, "ablate": {"scipy"}}
    assert not core & set().union(*extras.values()) and {"torch", "torchvision", "timm"} <= core
    assert set(extras) == set(EXTRAS)                              # each extra has its one-line message
    with open(os.path.join(ROOT, "Makefile")) as f:
        (installed,) = re.findall(r"^EXTRAS\s*:=\s*(\S+)", f.read(), re.M)
    assert set(installed.split(",")) == set(extras)


@pytest.mark.parametrize("module, extra, package", [("onnxruntime", "export", "onnxruntime"),
                                                    ("faiss", "index", "faiss"),
                                                    ("scipy.stats", "ablate", "scipy")])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, module, extra, package):
    monkeypatch.setitem(sys.modules, module, None)      # as if not installed
    with pytest.raises(UserError) as e:
        import_extra(module, extra)
    assert f"{package} is not installed" in str(e.value) and f".[{extra}]" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def _without(modules: Sequence[str], script: str, *argv: str) -> subprocess.CompletedProcess:
    """``script argv`` run in a fresh interpreter where ``modules`` cannot be imported (as if not installed)."""
    code = (f"import runpy, sys\nsys.modules.update(dict.fromkeys({sorted(modules)!r}))\n"
            f"sys.argv = {[script, *argv]!r}\nrunpy.run_path({script!r}, run_name='__main__')\n")
    env = {**os.environ, "SVLLREID_PROGRESS": "off", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def _extra_modules(*extras: str) -> set[str]:
    """The top-level modules the distributions of ``extras`` install (faiss-cpu: faiss)."""
    dists = set().union(*(_extras()[e] for e in extras))
    return {m for m, ds in importlib.metadata.packages_distributions().items()
            if any(canonicalize_name(d) in dists for d in ds)}


@pytest.mark.slow
@pytest.mark.parametrize("extra, script, argv", [
    ("index", "tools/build_index.py", ["--features", "f.npz", "--out", "INDEX"]),
    ("ablate", "tools/ablate.py", ["--report", "ABLATION"])])
def test_a_tool_without_its_extra_says_which_to_install(tmp_path, extra, script, argv):
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    if extra == "ablate":
        (tmp_path / "ABLATION").mkdir()
    out = _without(_extra_modules(extra), script, *argv)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "is not installed" in line and f"pip install -e '.[{extra}]'" in line
    assert not (tmp_path / "INDEX").exists()


@pytest.mark.slow
def test_training_and_evaluation_need_no_extra(tiny_root, tmp_path):
    """``pip install -e .`` without extras: a tiny training and its evaluation run with every extra's
    modules unimportable (the training ends without its curves.png)."""
    blocked = _extra_modules(*_extras())
    assert {"faiss", "scipy", "onnx", "onnxruntime", "matplotlib", "tensorboard"} <= blocked
    out = _without(blocked, "train_svllreid.py", *train_argv(tiny_root, tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "ViT-B-16_2.pth").is_file() and not (tmp_path / "run" / "curves.png").exists()
    out = _without(blocked, "test_svllreid.py", "--config_file", DEMO,
                   *tool_opts(tiny_root, tmp_path / "run" / "ViT-B-16_2.pth"), "OUTPUT_DIR", str(tmp_path / "eval"),
                   "TEST.VISUALIZE", "False")      # the default; the demo config asks for the pictures (record)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mAP" in out.stdout + out.stderr


@pytest.mark.slow
def test_only_the_editable_install_is_built(tmp_path):
    """A wheel (pip install ., pip wheel .) is refused in one line: it would put the top-level packages,
    datasets among them, into site-packages. The editable wheel of ``pip install -e .`` is built."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "__init__.py").write_text("")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp_path / "wheels"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "svllreid installs editable only: pip install -e ." in out.stdout + out.stderr
    assert not list(tmp_path.glob("wheels/*.whl"))
    code = ("import sys\nfrom setuptools import build_meta\n"
            "print(build_meta.build_editable(sys.argv[1], {'editable_mode': 'compat'}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "editable")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("svllreid-") and (tmp_path / "editable").is_dir()


def test_training_ends_without_its_picture_when_matplotlib_is_missing(tmp_path, monkeypatch, caplog):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"stage": 2, "epoch": 1, "kind": "epoch", "loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with caplog.at_level(logging.WARNING, logger="svllreid"):
        assert write_curves(str(tmp_path)) is None
    assert "curves.png not drawn" in caplog.text and ".[record]" in caplog.text
    assert not (tmp_path / "curves.png").exists()
