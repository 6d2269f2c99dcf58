#!/usr/bin/env python3
"""Build the patched tree into one Python environment: the recipe behind `nox -s build` and the Docker image.

Steps, each skipped when its stamp says nothing changed (so a re-run is a quick no-op):

1. initialise the submodules under external/ that are not yet checked out (never touches initialised ones);
2. create the virtual environment (default .venv; the Docker image passes --venv /opt/venv);
3. install the pinned requirements (constraints.txt is the single source of versions, torch included);
4. apply the patch series (tools/patches.py apply: refuses to clobber local work in a submodule);
5. compile and install detectron2, then AdelaiDet, editable and without build isolation, so their C++/CUDA
   extensions are built against the torch in the environment;
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


def python_info(python: Path, *, with_torch: bool = False) -> dict[str, str]:
    """Version and prefix of the environment's interpreter (and its torch version: slow, imports torch)."""
    code = "import json, sys\ninfo = {'python': sys.version.split()[0], 'prefix': sys.prefix}\n"
    if with_torch:
        code += "import torch\ninfo['torch'] = torch.__version__\n"
    out = subprocess.run(
        [str(python), "-c", code + "print(json.dumps(info))"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise BuildError(f"{python} cannot report its versions:\n{out.stderr.strip()}")
    return json.loads(out.stdout)


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
    python: Path, stamp: Stamp, project: patches.Project, name: str, env: dict[str, str], torch_version: str
) -> None:
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
    if stamp.matches(name, want):
        log(f"{name}: built at {head[:12]} with torch {want['torch']}, unchanged, skipped")
        return
    started = time.monotonic()
    # -e + --no-build-isolation: the extension compiles against the environment's torch, and the Python
    # sources stay in external/<name>, so edits to a patched tree are live.
    pip(
        python, "install", "--quiet", "--no-build-isolation", "-c", str(CONSTRAINTS), "-e", str(repo), env=env
    )
    stamp.record(name, want)
    log(f"{name}: built in {time.monotonic() - started:.0f} s")


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
    torch_version = python_info(interpreter, with_torch=True)["torch"]
    for name in UPSTREAMS:
        build_upstream(interpreter, stamp, project, name, env, torch_version)
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
