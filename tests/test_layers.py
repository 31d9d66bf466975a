"""The house rules, read from the source: who may import whom, and no import cycles.

Every ``import`` and ``from ... import`` statement in cmatrix/ counts, including those
inside functions (a deferred import is still a dependency). Layers, lowest first:

    errors, _version      0
    core                  1   pure helpers: no MPI, no files
    io, backends          2   files; devices (a backend never sees MPI)
    engine                3   comm (the only mpi4py importer), protocol, runtime, driver
    ops, llm              4   the commands, both halves
    api, serve            5   the Cluster facade and the session; the HTTP server
    compat, nn, cli       6
    the package's __init__ and __main__   7

A module may import from lower layers and from its own subpackage, nothing else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cmatrix
from cmatrix.engine.protocol import HEADERS, RANK_HALVES

PACKAGE = Path(cmatrix.__file__).resolve().parent
LAYERS = {"errors": 0, "_version": 0, "core": 1, "io": 2, "backends": 2, "engine": 3, "ops": 4, "llm": 4,
          "api": 5, "serve": 5, "compat": 6, "nn": 6, "cli": 6, "__init__": 7, "__main__": 7}


def _modules() -> dict[str, Path]:
    """Dotted name (``cmatrix.ops.matmul``) -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The cmatrix modules (or other top-level packages) that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # "from . import x" may name a module x of that package
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> tuple[str, int]:
    """(subpackage or top-level module, its layer) of a cmatrix module."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return top, LAYERS[top]


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "cmatrix":
            assert _layer(name)[0] in LAYERS, f"{name} belongs to no layer: add it to LAYERS"


def test_imports_go_down_the_layers():
    wrong = []
    for name, targets in GRAPH.items():
        if name == "cmatrix":
            continue
        top, level = _layer(name)
        for target in targets:
            if not target.startswith("cmatrix.") or target == "cmatrix":
                continue
            to_top, to_level = _layer(target)
            if to_top != top and to_level >= level:
                wrong.append(f"{name} (layer {level}) imports {target} (layer {to_level})")
    assert not wrong, "\n".join(wrong)


def test_only_engine_comm_imports_mpi4py():
    users = sorted(name for name, targets in GRAPH.items()
                   if any(t == "mpi4py" or t.startswith("mpi4py.") for t in targets))
    assert users == ["cmatrix.engine.comm"]


@pytest.mark.parametrize("low", ["core", "backends", "io"])
def test_lower_layers_import_nothing_above_them(low):
    """Spelled out for the rules DESIGN.md names (the general rule above covers them too)."""
    above = {top for top, level in LAYERS.items() if level > LAYERS[low] and top not in ("__init__",)}
    for name, targets in GRAPH.items():
        if name.startswith(f"cmatrix.{low}"):
            bad = [t for t in targets if t.startswith("cmatrix.") and t.split(".")[1] in above]
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    internal = {name: {t for t in targets if t in MODULES and t != name} for name, targets in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(internal[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(internal):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_every_command_has_a_header_and_a_rank_half():
    import cmatrix.api.session  # noqa: F401  (what a rank imports before it serves)

    assert set(HEADERS) == set(RANK_HALVES), set(HEADERS) ^ set(RANK_HALVES)
    assert {"configure", "shard", "matmul", "nodeop", "llm_step", "free"} <= set(HEADERS)


def test_the_top_level_holds_a_handful_of_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_version.py", "errors.py", "nn.py"], top
