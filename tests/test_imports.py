"""No import cycles among graphopt's modules (graphopt/, passes/ as graphopt.passes, kernels/ as graphopt.kernels),
counting imports inside functions too: a function-level import is how cycles usually hide."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"graphopt": "graphopt", "passes": "graphopt.passes", "kernels": "graphopt.kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _canonical(name: str) -> str:
    head = name.split(".")[0]
    return name.replace(head, PACKAGES[head], 1) if head in ("passes", "kernels") else name


def _imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Every graphopt module an AST imports, anywhere but under ``if TYPE_CHECKING:``."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {_canonical(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = _canonical(node.module)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules}


def import_graph() -> nx.DiGraph:
    """Module -> the graphopt modules it imports."""
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(ast.parse(path.read_text()), modules) - {name}:
            graph.add_edge(name, target)
    return graph


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert graph.number_of_nodes() > 60 and graph.number_of_edges() > 200  # the walk really saw the package
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_pass_interface_depends_on_nothing_of_the_pipeline():
    graph = import_graph()
    reach = nx.descendants(graph, "graphopt.pass_base")
    assert not reach & {"graphopt.pipeline", "graphopt.registry", "graphopt.api", "graphopt.instruments"}, reach
    assert "graphopt.pass_base" in nx.descendants(graph, "graphopt.pipeline")


def test_every_module_imports():
    for name in sorted(_modules()):
        if name.endswith("__main__"):  # runs the command line
            continue
        module = importlib.import_module(name)
        assert module.__name__ == name and module.__doc__, f"{name} imports but has no docstring"
