"""The code layout keeps its order: every import runs downward, ``utils/`` at the ground.

Rooms are the top-level packages, folders and modules of the project. Each has a level
(:data:`ORDER`); a module may import only rooms of a lower level (and its own room). The
check reads every ``.py`` file with :mod:`ast`, so imports inside functions count too.
Run with ``-s`` to see the figures (rooms, arrows, back-arrows, the biggest room's share).
"""
from __future__ import annotations

import ast
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
