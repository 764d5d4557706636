"""The package layout's rules (docs/architecture.md): which package may import which, and no import cycle.

Imports are read from the source (every ``import`` statement, also inside functions), so a cycle hidden by a
function-level import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "knn_cm"

# Each unit of the layout and the units it may import (besides itself). The foundations import nothing of
# knn_cm; the apps (train.py, sample.py, ...) and scripts sit above everything and are not listed.
FOUNDATIONS = {"knn_cm.io", "knn_cm.settings", "knn_cm.device", "knn_cm.weights_only", "knn_cm.numerics",
               "knn_cm.host_syncs", "knn_cm.cli"}  # cli: the apps' command-line edge, no knn_cm import
ALLOWED = {
    "foundations": set(),
    "knn_cm.data": {"foundations"},
    "knn_cm.search": {"knn_cm.data", "foundations"},
    # models: the network estimator
    "knn_cm.estimators": {"knn_cm.search", "knn_cm.models", "knn_cm.data", "foundations"},
    "knn_cm.diffusion": {"foundations"},
    "knn_cm.models": {"knn_cm.data", "foundations"},
    "knn_cm.sampling": {"knn_cm.diffusion", "knn_cm.estimators", "knn_cm.models", "knn_cm.data", "foundations"},
    "knn_cm.runs": {"foundations"},
    "knn_cm.training": {"knn_cm.runs", "knn_cm.sampling", "knn_cm.estimators", "knn_cm.search", "knn_cm.models",
                        "knn_cm.diffusion", "knn_cm.data", "foundations"},
    "knn_cm.evaluation": {"knn_cm.runs", "knn_cm.sampling", "knn_cm.estimators", "knn_cm.search", "knn_cm.models",
                          "knn_cm.diffusion", "knn_cm.data", "foundations"},
    "knn_cm.paper": {"foundations"},
    "knn_cm.launch": {"knn_cm.paper", "knn_cm.runs", "foundations"},
    "knn_cm.report": {"knn_cm.paper", "knn_cm.evaluation", "knn_cm.runs", "foundations"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """knn_cm modules imported anywhere in ``path`` (``from knn_cm.x import y`` counts as knn_cm.x.y when that
    is a module, else knn_cm.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("knn_cm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("knn_cm"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def unit(module: str) -> str:
    if module in FOUNDATIONS:
        return "foundations"
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return module


def test_every_module_belongs_to_a_unit_of_the_layout():
    assert [m for m in MODULES if m != "knn_cm" and unit(m) not in ALLOWED] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "knn_cm"))
def test_imports_follow_the_layout(module):
    own = unit(module)
    bad = sorted(target for target in GRAPH[module] if unit(target) not in ALLOWED[own] | {own})
    assert bad == [], f"{module} ({own}) may import {sorted(ALLOWED[own])}, not {bad}"


def test_no_import_cycle_in_knn_cm():
    """Depth-first search over every import (function-level ones included); reports one cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
