"""tools/build.py's stamp: "unchanged, skipped" only while the compiled extensions it built exist and load.

No compile here: a standard-library extension module, copied into a synthetic submodule, stands in for
detectron2's `_C`; a file of garbage stands in for one that no longer loads.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import TOOLS, World

pytestmark = pytest.mark.patches


def _load_build_tool():
    spec = importlib.util.spec_from_file_location("build_tool", TOOLS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_tool()


def stdlib_extension() -> Path:
    """A compiled extension module of this interpreter, whatever its name (its init symbol must match)."""
    for name in ("_json", "_csv", "array", "_struct", "math"):
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and spec.origin.endswith(".so"):
            return Path(spec.origin)
    pytest.skip("this interpreter has no compiled standard-library module in a file")


class FakeStamp(build.Stamp):
    """The build stamp, kept in a temporary file instead of the real environment."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {}


@pytest.fixture
def builder(patched: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """build_upstream on the synthetic submodule `lib`, with a pip whose "compile" drops the extension in."""
    extension = stdlib_extension()
    compiled = patched.sub / "lib" / extension.name
    pip_runs: list[tuple[str, ...]] = []

    def fake_pip(python: Path, *args: str, env=None) -> None:
        pip_runs.append(args)
        (patched.sub / "build" / "lib").mkdir(parents=True, exist_ok=True)
        shutil.copy(extension, patched.sub / "build" / "lib" / extension.name)  # scratch: not what loads
        shutil.copy(extension, compiled)

    monkeypatch.setattr(build, "pip", fake_pip)
    project = build.patches.Project(patched.root)
    stamp = FakeStamp(tmp_path / "stamp.json")
    python = Path(sys.executable)

    def run() -> None:
        broken = build.python_info(python, extensions=build.claimed_extensions(stamp, project, ["lib"]))[
            "broken"
        ]
        build.build_upstream(python, stamp, project, "lib", {}, "2.0", broken)

    return run, pip_runs, compiled, stamp


def test_unchanged_build_is_skipped_while_its_extension_loads(builder, capsys) -> None:
    run, pip_runs, compiled, stamp = builder
    run()
    assert len(pip_runs) == 1
    assert stamp.data["lib"]["extensions"] == [f"lib/{compiled.name}"], "build/ is scratch, not recorded"
    run()
    assert len(pip_runs) == 1
    assert "unchanged, skipped" in capsys.readouterr().out


def test_deleted_extension_is_rebuilt(builder, capsys) -> None:
    run, pip_runs, compiled, _ = builder
    run()
    compiled.unlink()  # what `git submodule deinit -f` + `git submodule update` leave: sources, no binary
    run()
    assert len(pip_runs) == 2
    assert f"lib/{compiled.name} is missing" in capsys.readouterr().out
    assert compiled.is_file()


def test_extension_that_does_not_load_is_rebuilt(builder, capsys) -> None:
    run, pip_runs, compiled, _ = builder
    run()
    compiled.write_bytes(b"not an ELF file")
    run()
    assert len(pip_runs) == 2
    assert f"lib/{compiled.name} does not load" in capsys.readouterr().out


def test_stamp_from_before_extensions_were_listed(builder, capsys) -> None:
    run, pip_runs, compiled, stamp = builder
    run()
    del stamp.data["lib"]["extensions"]  # an older build's stamp: the extension on disk is adopted
    run()
    assert len(pip_runs) == 1 and "unchanged, skipped" in capsys.readouterr().out
    del stamp.data["lib"]["extensions"]
    compiled.unlink()  # ... unless there is none
    run()
    assert len(pip_runs) == 2


def test_python_info_reports_what_fails_to_load(tmp_path: Path) -> None:
    good = tmp_path / stdlib_extension().name
    shutil.copy(stdlib_extension(), good)
    bad = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    bad.write_bytes(b"\0" * 64)
    broken = build.python_info(Path(sys.executable), extensions=[good, bad])["broken"]
    assert list(broken) == [str(bad)] and "ImportError" in broken[str(bad)]
