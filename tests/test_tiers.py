"""The test suite's own shape: test modules share code only through tests/helpers.py (or
reference/evaluation.py and conftest.py), never by importing one another, and every test module
keeps at least one test in the fast tier (``make test`` = ``pytest -m "not slow"``)."""
from __future__ import annotations

import ast
import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_MODULES = sorted(glob.glob(os.path.join(HERE, "test_*.py")))
TEST_NAMES = {os.path.splitext(os.path.basename(p))[0] for p in TEST_MODULES}


def _tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def imported_test_modules(path: str, names: set[str] = TEST_NAMES) -> set[str]:
    """Names of the test modules ``names`` (tests/test_*.py) that the module at ``path`` imports,
    at the top or inside a function, as ``test_x``, ``tests.test_x`` or ``from tests import test_x``."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            imported = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative: from . import test_x / from .test_x import y
            imported = [a.name for a in node.names] + ([node.module] if node.module else [])
        else:
            continue
        for name in imported:
            parts = name.split(".")
            if parts[0] in names or (parts[0] == "tests" and len(parts) > 1 and parts[1] in names):
                found.add(parts[1] if parts[0] == "tests" else parts[0])
    return found


def _is_slow_mark(node: ast.expr) -> bool:
    """``pytest.mark.slow`` (or ``mark.slow``), called or not."""
    node = node.func if isinstance(node, ast.Call) else node
    return isinstance(node, ast.Attribute) and node.attr == "slow"


def fast_tests(path: str) -> list[str]:
    """Test functions of the module at ``path`` that are not marked ``slow`` (by a decorator
    or a module-level ``pytestmark``)."""
    tree = _tree(path)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                for t in stmt.targets):
            marks = stmt.value.elts if isinstance(stmt.value, (ast.List, ast.Tuple)) else [stmt.value]
            if any(_is_slow_mark(m) for m in marks):
                return []
    return [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
            and not any(_is_slow_mark(d) for d in f.decorator_list)]


def test_the_checker_sees_every_import_form(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("import test_a\nfrom tests.test_b import x\nfrom tests import test_c\n"
                   "def f():\n    from test_d import y\n"
                   "import tests.helpers\nfrom tests.reference import z\nimport test_svllreid\n")
    names = {"test_a", "test_b", "test_c", "test_d", "test_e"}
    assert imported_test_modules(str(src), names) == {"test_a", "test_b", "test_c", "test_d"}


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py: a test module imports no other test module
    (test_svllreid, the evaluation script at the repository root, is not one)."""
    assert len(TEST_MODULES) > 20
    crossing = {os.path.basename(p): sorted(imported_test_modules(p)) for p in TEST_MODULES}
    crossing = {k: v for k, v in crossing.items() if v}
    assert not crossing, f"test modules importing other test modules (move the helper to tests/helpers.py): {crossing}"


def test_every_module_has_a_fast_test():
    """``make test`` exercises every module: none is marked slow as a whole."""
    without = [os.path.basename(p) for p in TEST_MODULES if not fast_tests(p)]
    assert not without, f"modules with no test outside the slow tier: {without}"


def test_slow_marker_is_registered(pytestconfig):
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
