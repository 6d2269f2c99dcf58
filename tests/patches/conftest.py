"""Synthetic superproject + upstream repositories for exercising tools/patches.py end to end."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load_tool():
    spec = importlib.util.spec_from_file_location("patches_tool", TOOLS / "patches.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["patches_tool"] = module
    spec.loader.exec_module(module)
    return module


tool = _load_tool()

UPSTREAM_FILES = {
    "lib/core.py": "".join(f"def f{i}():\n    return {i}\n\n" for i in range(20)),
    "setup.py": 'install_requires = [\n    "numpy",\n]\n',
}


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, text=True, capture_output=True)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout.strip()


def commit_all(repo: Path, message: str, paths: tuple[str, ...] = ("--all",)) -> str:
    git(repo, "add", *paths)
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def why(subject: str) -> str:
    return f"{subject}\n\nWithout this the build breaks on a current toolchain.\n\nOrigin: vendor\nForwarded: no\n"


@dataclass
class World:
    upstream: Path
    root: Path

    @property
    def sub(self) -> Path:
        return self.root / "external" / "lib"

    @property
    def series_dir(self) -> Path:
        return self.root / "patches" / "lib"

    def run(self, *argv: str) -> int:
        return tool.main(["--root", str(self.root), *argv])

    def edit(self, repo: Path, path: str, old: str, new: str) -> None:
        target = repo / path
        text = target.read_text()
        assert old in text, f"{old!r} not in {path}"
        target.write_text(text.replace(old, new, 1))

    def add_patch(self, path: str, old: str, new: str, subject: str) -> None:
        """Commit a change in the submodule and export it into the series."""
        self.edit(self.sub, path, old, new)
        commit_all(self.sub, why(subject))
        assert self.run("export", "lib") == 0

    def upstream_commit(self, path: str, old: str, new: str, message: str = "upstream change") -> str:
        self.edit(self.upstream, path, old, new)
        return commit_all(self.upstream, message)

    def patch_bytes(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.series_dir.iterdir())}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    # Hermetic git: no user config, fixed identities, local file:// submodules allowed.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    (tmp_path / "gitconfig").write_text(
        "[user]\n\tname = Test Author\n\temail = author@example.invalid\n"
        '[protocol "file"]\n\tallow = always\n[init]\n\tdefaultBranch = main\n'
    )
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "--quiet")
    for rel, text in UPSTREAM_FILES.items():
        (upstream / rel).parent.mkdir(parents=True, exist_ok=True)
        (upstream / rel).write_text(text)
    commit_all(upstream, "upstream v1")

    root = tmp_path / "super"
    root.mkdir()
    git(root, "init", "--quiet")
    git(root, "submodule", "--quiet", "add", upstream.as_uri(), "external/lib")
    (root / "patches" / "lib").mkdir(parents=True)
    (root / "patches" / "lib" / "series").write_text("# test series\n")
    commit_all(root, "superproject with a pinned submodule")
    return World(upstream=upstream, root=root)


@pytest.fixture
def patched(world: World) -> World:
    """A world whose series has two patches touching different files, committed in the superproject."""
    world.add_patch("lib/core.py", "return 3\n", "return 3  # patched\n", "core: mark f3")
    world.add_patch(
        "setup.py", '"numpy",\n', '"numpy",\n    "opencv-python-headless",\n', "setup: declare opencv"
    )
    commit_all(world.root, "add series", paths=("patches",))
    return world
