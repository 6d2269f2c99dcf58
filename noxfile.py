"""Sessions for building, testing and maintaining model-quantization.

Every session uses ONE environment (`.venv`, or $MQ_VENV) built by `tools/build.py`; nox itself creates no
virtualenvs (`venv_backend="none"`), so the 6 GB torch install exists once, not once per session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("MQ_VENV", ROOT / ".venv")).resolve()
VENV_PYTHON = VENV / "bin" / "python"

nox.options.sessions = ["lint", "test"]
nox.options.default_venv_backend = "none"


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
    session.run(python, "-m", "pytest", *session.posargs, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and `patches check` (lint the series, re-export, fail on any diff)."""
    python = _build(session)
    session.run(python, "-m", "ruff", "check", ".", external=True)
    session.run(python, "-m", "ruff", "format", "--check", ".", external=True)
    session.run(sys.executable, str(ROOT / "tools" / "patches.py"), "check", external=True)


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
