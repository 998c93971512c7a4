"""The package installs editable only: ``pip install -e .`` (what ``make`` does); pyproject.toml
defines it.

A wheel would copy the top-level packages (``datasets``, ``utils``, ``config``, ``model`` ...) into
site-packages, where ``datasets`` would shadow Hugging Face's package of that name. So building one
(``pip install .``, ``pip wheel .``, ``python -m build``) is refused in one line; the editable
install does not build that command's wheel and is unaffected.
"""
from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel

EDITABLE_ONLY = ("svllreid installs editable only: pip install -e . (or make); a wheel would put its top-level "
                 "packages (datasets, utils, config, model ...) into site-packages, where datasets shadows "
                 "Hugging Face's datasets")


class EditableOnly(bdist_wheel):
    """``bdist_wheel`` that refuses to build."""

    def run(self) -> None:
        raise SystemExit(f"error: {EDITABLE_ONLY}")


setup(cmdclass={"bdist_wheel": EditableOnly})
