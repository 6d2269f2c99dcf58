#!/usr/bin/env python3
"""Build the patched tree into one Python environment: the recipe behind `nox -s build` and the Docker image.

Steps, each skipped when its stamp says nothing changed (so a re-run is a quick no-op):

1. initialise the submodules under external/ that are not yet checked out (never touches initialised ones);
2. create the virtual environment (default .venv; the Docker image passes --venv /opt/venv);
3. install the pinned requirements (constraints.txt is the single source of versions, torch included);
4. apply the patch series (tools/patches.py apply: refuses to clobber local work in a submodule);
5. compile and install detectron2, then AdelaiDet, editable and without build isolation, so their C++/CUDA
   extensions are built against the torch in the environment (and rebuilt when one is missing or fails to
   load, though the stamp matches);
6. install model_quantization editable.

Standard library only: it runs before the environment it creates exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import patches  # noqa: E402  (tools/ is not a package; the build runs before any install)

CONSTRAINTS = ROOT / "constraints.txt"
REQUIREMENTS = ROOT / "requirements.txt"
#: Built in this order: AdelaiDet's setup.py imports detectron2.
UPSTREAMS = ("detectron2", "AdelaiDet")
STAMP_NAME = "model-quantization-build.json"
DEFAULT_VENV = ROOT / ".venv"


class BuildError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[build] {message}", flush=True)


def run(cmd: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise BuildError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ steps


def init_submodules(project: patches.Project) -> None:
    """Check out the pinned submodules that are missing; explain how to get them when that fails."""
    missing = [project.relpath(n) for n in UPSTREAMS if not (project.submodule_path(n) / ".git").exists()]
    if not missing:
        return
    log(f"initialising submodules: {', '.join(missing)}")
    proc = subprocess.run(
        ["git", "submodule", "update", "--init", "--", *missing], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        urls = subprocess.run(
            ["git", "config", "-f", ".gitmodules", "--get-regexp", r"submodule\..*\.url"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        url_lines = "\n".join(f"    {line.split(' ', 1)[1]}" for line in urls if " " in line)
        raise BuildError(
            "cannot fetch the pinned upstream sources (git submodule update --init failed):\n"
            f"{(proc.stderr or proc.stdout).strip()}\n\n"
            "The build needs these repositories:\n"
            f"{url_lines}\n"
            "Either give this machine network access to them, or point git at a mirror that has the pinned "
            "commits, e.g.\n"
            "    git config --global url./path/to/mirror/detectron2.insteadOf "
            "https://github.com/facebookresearch/detectron2.git\n"
            "(for a local path also: git config --global protocol.file.allow always), then run the build again."
        )


def ensure_environment(venv: Path) -> Path:
    """Return the venv's interpreter, creating the venv when needed."""
    interpreter = venv / "bin" / "python"
    if not interpreter.exists():
        log(f"creating the environment in {venv}")
        run([sys.executable, "-m", "venv", str(venv)])
        # detectron2's editable install with --no-build-isolation needs a pip that understands PEP 660.
        run([str(interpreter), "-m", "pip", "install", "--quiet", "--upgrade", "pip", "setuptools", "wheel"])
    return interpreter


#: Run by the environment's interpreter: its versions, and which compiled extension files (argv) fail to
#: load. Loading by file path skips the package's __init__ (slow, and not what is being checked).
PROBE = """
import importlib.util, json, os, sys
info = {"python": sys.version.split()[0], "prefix": sys.prefix, "broken": {}}
if WITH_TORCH:
    import torch  # first: the extensions link against the libraries it loads
    info["torch"] = torch.__version__
for path in sys.argv[1:]:
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path).split(".")[0], path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as exc:
        info["broken"][path] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info))
"""


def python_info(python: Path, *, with_torch: bool = False, extensions: Sequence[Path] = ()) -> dict:
    """Ask the environment's interpreter about itself.

    Args:
        python: the interpreter.
        with_torch: also report its torch version (slow: imports torch).
        extensions: compiled extension module files to load there, after torch when `with_torch`.

    Returns:
        "python" (version), "prefix", "torch" when asked, and "broken": {file: why} for each extension
        that fails to load.
    """
    code = PROBE.replace("WITH_TORCH", str(with_torch))
    out = subprocess.run([str(python), "-c", code, *map(str, extensions)], capture_output=True, text=True)
    if out.returncode != 0 and extensions:
        # A stale extension can crash the interpreter outright: then each one counts as broken.
        info = python_info(python, with_torch=with_torch)
        crash = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        info["broken"] = {
            str(path): f"loading the extensions crashed the interpreter: {crash}" for path in extensions
        }
        return info
    if out.returncode != 0:
        raise BuildError(f"{python} cannot report its versions:\n{out.stderr.strip()}")
    return json.loads(out.stdout)


def extension_files(repo: Path) -> list[str]:
    """The compiled extension modules an editable build left in `repo`'s source tree, relative to it."""
    found = (p.relative_to(repo) for pattern in ("*.so", "*.pyd") for p in repo.rglob(pattern))
    return sorted(str(rel) for rel in found if rel.parts[0] != "build")  # build/ is setuptools' scratch


def claimed_extensions(stamp: Stamp, project: patches.Project, names: Sequence[str]) -> list[Path]:
    """The compiled extension files the stamp says were built for the upstreams `names`, those on disk.

    A stamp from before stamps listed them adopts what the source tree holds, so that upgrading does not
    recompile a good build; a tree without any is rebuilt (see stale_reason).
    """
    files: list[Path] = []
    for name in names:
        entry = stamp.data.get(name)
        repo = project.submodule_path(name)
        if entry and "extensions" not in entry and extension_files(repo):
            entry["extensions"] = extension_files(repo)
        files += [repo / rel for rel in (entry or {}).get("extensions", [])]
    return [path for path in files if path.is_file()]


def stale_reason(recorded: dict | None, want: dict, repo: Path, broken: dict[str, str]) -> str | None:
    """Why an upstream must be (re)built, or None when its stamp still tells the truth.

    Matching inputs are not enough: `git submodule deinit -f` or `git clean -fdx` delete the compiled
    extensions from the source tree and change no input, and the import then fails far from the cause.

    Args:
        recorded: what the stamp says was built (None: nothing).
        want: the inputs of a build now (pin, series hash, HEAD, torch, CUDA settings).
        repo: the upstream's source tree.
        broken: {file: why} for recorded extension files that fail to load (see python_info).
    """
    if not recorded:
        return "not built yet"
    changed = [key for key in want if recorded.get(key) != want[key]]
    if changed:
        return f"{', '.join(changed)} changed"
    if "extensions" not in recorded:
        return "the stamp does not list the compiled extensions (an older build)"
    for rel in recorded["extensions"]:
        if not (repo / rel).is_file():
            return f"{rel} is missing"
        if str(repo / rel) in broken:
            return f"{rel} does not load ({broken[str(repo / rel)]})"
    return None


class Stamp:
    """What was built into an environment, kept inside it (a fresh environment starts from nothing)."""

    def __init__(self, python: Path):
        prefix = Path(python_info(python)["prefix"])
        self.path = prefix / STAMP_NAME
        try:
            self.data: dict = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.data = {}

    def matches(self, key: str, value: dict) -> bool:
        return self.data.get(key) == value

    def record(self, key: str, value: dict) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")


def pip(python: Path, *args: str, env: dict[str, str] | None = None) -> None:
    run([str(python), "-m", "pip", *args], env=env)


def install_requirements(python: Path, stamp: Stamp, extra: list[str]) -> None:
    want = {
        "requirements": file_digest(CONSTRAINTS, REQUIREMENTS),
        "python": python_info(python)["python"],
        "extra": extra,
    }
    if stamp.matches("requirements", want):
        log("requirements: unchanged, skipped")
        return
    pip(python, "install", "--quiet", "-c", str(CONSTRAINTS), "-r", str(REQUIREMENTS), *extra)
    stamp.record("requirements", want)


def build_upstream(
    python: Path,
    stamp: Stamp,
    project: patches.Project,
    name: str,
    env: dict[str, str],
    torch_version: str,
    broken: dict[str, str],
) -> None:
    """Compile and install external/<name> editable, unless its stamp holds (see stale_reason)."""
    repo = project.submodule(name)
    head = patches.git_out(repo, "rev-parse", "HEAD")
    want = {
        "pin": project.pin(name),
        "series": project.series(name).digest(),
        "head": head,
        "torch": torch_version,
        "cuda": env.get("FORCE_CUDA", ""),
        "arch": env.get("TORCH_CUDA_ARCH_LIST", ""),
    }
    reason = stale_reason(stamp.data.get(name), want, repo, broken)
    if reason is None:
        log(f"{name}: built at {head[:12]} with torch {want['torch']}, unchanged, skipped")
        return
    log(f"{name}: building: {reason}")
    started = time.monotonic()
    # -e + --no-build-isolation: the extension compiles against the environment's torch, and the Python
    # sources stay in external/<name>, so edits to a patched tree are live.
    pip(
        python, "install", "--quiet", "--no-build-isolation", "-c", str(CONSTRAINTS), "-e", str(repo), env=env
    )
    extensions = extension_files(repo)
    stamp.record(name, {**want, "extensions": extensions})
    log(f"{name}: built in {time.monotonic() - started:.0f} s; extensions: {', '.join(extensions) or 'none'}")


def install_self(python: Path, stamp: Stamp) -> None:
    want = {"pyproject": file_digest(ROOT / "pyproject.toml")}
    if stamp.matches("model_quantization", want):
        log("model_quantization: unchanged, skipped")
        return
    pip(python, "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    stamp.record("model_quantization", want)


def build(venv: Path = DEFAULT_VENV, force_patches: bool = False) -> Path:
    """Run every step; returns the environment's interpreter."""
    started = time.monotonic()
    project = patches.Project(ROOT)
    init_submodules(project)
    interpreter = ensure_environment(venv)
    stamp = Stamp(interpreter)
    install_requirements(interpreter, stamp, extra=[])
    for name in UPSTREAMS:
        patches.apply_series(project, name, force=force_patches)
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    for var in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CC", "CXX"):
        if var in os.environ:
            env[var] = os.environ[var]
    # One interpreter start (torch is slow to import) checks every extension the stamp says was built.
    info = python_info(interpreter, with_torch=True, extensions=claimed_extensions(stamp, project, UPSTREAMS))
    for name in UPSTREAMS:
        build_upstream(interpreter, stamp, project, name, env, info["torch"], info["broken"])
    install_self(interpreter, stamp)
    log(f"environment ready: {interpreter} ({time.monotonic() - started:.1f} s)")
    return interpreter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("MQ_VENV", DEFAULT_VENV)))
    parser.add_argument("--force-patches", action="store_true", help="see `patches apply --force`")
    args = parser.parse_args(argv)
    try:
        build(venv=args.venv.resolve(), force_patches=args.force_patches)
    except (BuildError, patches.PatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
