"""`pip install -e .` alone (no extra) holds every package a run needs: the modules the project
imports at module level, and the optional packages of Lightning that the default callbacks need."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys

import yaml
from hydra.utils import get_class
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

FIRST_PARTY = {"src", "callbacks", "data_modules", "tests", "benchmarks"}


def core_closure() -> set[str]:
    """The distributions ``pip install -e .`` brings: the core requirements and theirs, no extras."""
    seen, todo = set(), ["anomalymoe"]
    while todo:
        try:
            requirements = md.requires(todo.pop()) or []
        except md.PackageNotFoundError:  # excluded by a marker on this platform
            continue
        for line in requirements:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or another platform's
            name = canonicalize_name(req.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def module_level_imports() -> dict[str, str]:
    """{top-level module: a file importing it} for the imports at module level of the package code."""
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("callbacks/*.py"), *ROOT.glob("data_modules/**/*.py"),
             ROOT / "run.py"]
    found = {}
    for path in files:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_module_level_import_comes_with_the_core_install():
    closure = core_closure()
    owners = md.packages_distributions()
    missing = []
    for module, path in module_level_imports().items():
        if module in sys.stdlib_module_names or module in FIRST_PARTY or module == "__future__":
            continue
        if not any(canonicalize_name(d) in closure for d in owners.get(module, [])):
            missing.append(f"{module} ({path}; distributions {owners.get(module)})")
    assert not missing, f"imported but not in pyproject's dependencies (nor theirs): {missing}"


def test_the_default_callbacks_optional_lightning_packages_are_core_dependencies():
    """Lightning does not require rich, but its RichProgressBar does: the default run builds one."""
    callbacks = yaml.safe_load((ROOT / "conf" / "callbacks" / "default.yaml").read_text())
    rich = [name for name, spec in callbacks.items()
            if issubclass(get_class(spec["_target_"]), (RichProgressBar, RichModelSummary))]
    assert rich, "conf/callbacks/default.yaml no longer builds a rich callback: drop this test"
    assert "rich" in core_closure(), f"callbacks {rich} need rich: add it to pyproject's dependencies"
