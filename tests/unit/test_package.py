"""Importing the package needs torch only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import model_quantization
import model_quantization.functional, model_quantization.quantizers, model_quantization.nn
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torchvision", "detectron2", "adelaidet", "cv2", "pycocotools"})
assert not heavy, heavy
assert not any(m.startswith("model_quantization.detectron2") for m in sys.modules)
print(len(model_quantization.QUANTIZERS))
"""


def test_import_needs_torch_only():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "9"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "model_quantization") -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its code (function-level imports too).

    ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``; importing a module also
    imports its parent packages, which are not counted as edges (every package would otherwise be a
    cycle with the children it imports).
    """
    files = sorted((ROOT / package).rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
        graph[name] = edges
    return graph


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "model_quantization.detectron2.architectures" in graph["model_quantization.detectron2.modeling"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_nox_sessions_that_share_the_cores_wait_passively():
    """`nox -s test` (this suite, in CI) runs with OpenMP's passive waiting unless the caller chose: idle
    threads that spin cost a second torch process its cores (`nox -s bench -- threads`: 2.9-6x slower)."""
    if os.environ.get("NOX_CURRENT_SESSION") != "test":
        pytest.skip("only meaningful under `nox -s test`; plain pytest keeps the caller's environment")
    assert os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
