"""docs/ stays true to the code: every config key it names exists, every relative link
resolves, and no code comment points to a document outside the repository."""
import glob
import os
import re

import pytest

from config import get_default_config, get_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = DOCS + [os.path.join(ROOT, "README.md")]
KEY = re.compile(r"`((?:MODEL|INPUT|DATASETS|DATALOADER|SOLVER|TEST)\.[A-Z0-9_.]*[A-Z0-9_])`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _ids(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def test_docs_exist_and_are_indexed():
    names = {os.path.basename(p) for p in DOCS}
    assert {"README.md", "method.md", "evaluation.md", "data.md", "fixes.md"} <= names
    index = open(os.path.join(ROOT, "docs", "README.md")).read()
    assert all(f"({n})" in index for n in names - {"README.md"})


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_every_config_key_named_in_the_docs_exists(path):
    cfg = get_default_config()
    keys = set(KEY.findall(open(path).read()))
    missing = []
    for key in keys:
        try:
            get_key(cfg, key)
        except (KeyError, AttributeError):
            missing.append(key)
    assert not missing, f"{os.path.relpath(path, ROOT)} names config keys that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("path", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(path):
    text = open(path).read()
    targets = [t for t in LINK.findall(text) if "://" not in t]
    broken = [t for t in targets if not os.path.exists(os.path.join(os.path.dirname(path), t))]
    assert not broken, f"{os.path.relpath(path, ROOT)}: broken links {broken}"


def test_no_comment_points_outside_the_repository():
    """Code and configs cite docs/, never an internal spec (e.g. 'SPEC §4')."""
    offenders = []
    for pattern in ("**/*.py", "**/*.yml", "Makefile"):
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            if os.sep + ".venv" + os.sep in path or os.path.samefile(path, __file__):
                continue
            for n, line in enumerate(open(path, errors="replace"), 1):
                if re.search(r"\bSPEC\b|§", line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}")
    assert not offenders, f"references to a document outside the repository: {offenders}"


def test_the_readme_stays_under_10_kb():
    """The README is the front page: details go to docs/ (it had grown to 10.8 KB once)."""
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 10_000
