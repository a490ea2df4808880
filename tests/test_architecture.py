"""The package's shape, kept: imports flow down the rooms (no cycle, no arrow up), the models stay pure (no timing,
no meters, no runner), and no function grows past 60 lines. Read from the source with ``ast``: nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "moe_energy"

# Lower rank = lower room: a module may import its own rank or below, never above (README's Architecture).
RANKS = {
    "moe_energy": 0, "moe_energy.errors": 0, "moe_energy.dtypes": 0, "moe_energy.device": 1, "moe_energy.memory": 1,
    "moe_energy.interrupts": 1, "moe_energy.storage.fileio": 1, "moe_energy.models": 2, "moe_energy.config": 3,
    "moe_energy.data": 4, "moe_energy.train": 4, "moe_energy.energy": 4, "moe_energy.measure": 5,
    "moe_energy.storage": 6, "moe_energy.power": 7, "moe_energy.runner": 8, "moe_energy.distributed": 9,
    "moe_energy.api": 9, "moe_energy.bench": 10, "moe_energy.report": 10, "moe_energy.commands": 11,
    "moe_energy.cli": 12, "moe_energy.__main__": 13,
}
MODELS_MAY_IMPORT = ("moe_energy.errors", "moe_energy.dtypes", "moe_energy.memory", "moe_energy.models")


def modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / PKG).rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = modules()


def imports(name: str) -> set[str]:
    """Every module of the package ``name`` imports, at the top or inside a function (TYPE_CHECKING blocks aside)."""
    path = MODULES[name]
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            if isinstance(ch, ast.ImportFrom):
                mod = ".".join(base[: len(base) - ch.level + 1] + ([ch.module] if ch.module else [])) \
                    if ch.level else (ch.module or "")
                for a in ch.names:
                    full = f"{mod}.{a.name}"
                    out.add(full if full in MODULES else mod)
            elif isinstance(ch, ast.Import):
                out.update(a.name for a in ch.names)
            visit(ch)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m in MODULES and m != name}


def rank(name: str) -> int:
    return RANKS[max((p for p in RANKS if name == p or name.startswith(p + ".")), key=len)]


def test_every_module_has_a_room():
    assert all(rank(m) >= 0 for m in MODULES)
    assert len(MODULES) > 60  # the walk found the package


def test_no_import_goes_up_a_room():
    up = [f"{a} -> {b}" for a in sorted(MODULES) for b in sorted(imports(a)) if rank(b) > rank(a)]
    assert up == []


def test_the_import_graph_has_no_cycle():
    graph = {m: imports(m) for m in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                walk(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("moe_energy.models")))
def test_models_stay_pure(name):
    """No timing, meters, runner or config in model code: auto's probe is the runner's (runner.prepare)."""
    stray = [m for m in imports(name) if not any(m == p or m.startswith(p + ".") for p in MODELS_MAY_IMPORT)]
    assert stray == []


def test_no_function_is_over_60_lines():
    long = [f"{p.relative_to(SRC)}:{n.lineno} {n.name}" for p in MODULES.values()
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


def test_the_checks_see_a_violation():
    """The rules can fail: an arrow up and a model's stray import are caught by the very functions used above."""
    assert rank("moe_energy.models.moe") < rank("moe_energy.measure.window") < rank("moe_energy.runner.core")
    assert "moe_energy.models.experts" in imports("moe_energy.models.strategies")
    assert "moe_energy.runner.prepare" in imports("moe_energy.runner.core")
