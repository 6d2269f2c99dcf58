"""Integration tests run against the patched, built submodules. They FAIL (never skip) when those are missing."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPSTREAMS = {"detectron2": "detectron2", "AdelaiDet": "adet"}
HOW_TO_BUILD = (
    "The integration tests need the patched, compiled submodules: run `nox -s test` (it builds first) or "
    "`nox -s build`. If the build cannot fetch external/*, give it network access or a mirror "
    "(git config --global url.<mirror>.insteadOf <url>)."
)


def _series_state(name: str) -> str | None:
    """Why external/<name> is not the built, patched tree of this checkout; None when it is."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import patches  # tools/patches.py: the stamp format is its own
    finally:
        sys.path.pop(0)
    project = patches.Project(ROOT)
    repo = project.submodule_path(name)
    if not (repo / ".git").exists():
        return f"external/{name} is not checked out"
    stamp = patches.read_json(patches.git_dir(repo) / patches.STAMP_FILE)
    if stamp is None:
        return f"the patch series was never applied to external/{name}"
    if stamp.get("series") != project.series(name).digest() or stamp.get("pin") != project.pin(name):
        return f"external/{name} was patched from another version of patches/{name} or another pin"
    return None


@pytest.fixture(scope="session")
def patched_tree() -> dict[str, object]:
    """The imported upstream packages, checked to come from this checkout's patched submodules."""
    modules = {}
    for name, package in UPSTREAMS.items():
        problem = _series_state(name)
        if problem:
            pytest.fail(f"{problem}. {HOW_TO_BUILD}", pytrace=False)
        try:
            module = importlib.import_module(package)
            importlib.import_module(f"{package}._C")  # the compiled extension
        except ImportError as exc:
            pytest.fail(f"cannot import {package}: {exc}. {HOW_TO_BUILD}", pytrace=False)
        origin = Path(module.__file__).resolve()
        if (ROOT / "external" / name) not in origin.parents:
            pytest.fail(
                f"{package} is imported from {origin}, not from external/{name}. {HOW_TO_BUILD}",
                pytrace=False,
            )
        modules[name] = module
    return modules
