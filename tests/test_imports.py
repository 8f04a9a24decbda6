"""No import cycles among graphopt's modules (graphopt/, passes/ as graphopt.passes, kernels/ as graphopt.kernels),
counting imports inside functions too: a function-level import is how cycles usually hide."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import subprocess
import sys
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
    reach = nx.descendants(graph, "graphopt.pipeline.pass_base")
    assert not reach & {"graphopt.pipeline.manager", "graphopt.pipeline.registry", "graphopt.api", "graphopt.pipeline.instruments"}, reach
    assert "graphopt.pipeline.pass_base" in nx.descendants(graph, "graphopt.pipeline.manager")


def test_every_module_imports():
    for name in sorted(_modules()):
        if name.endswith("__main__"):  # runs the command line
            continue
        module = importlib.import_module(name)
        assert module.__name__ == name and module.__doc__, f"{name} imports but has no docstring"


TOP_FILES = {"graphopt", "graphopt.api", "graphopt._moved"}  # the public face: may import all but the command line


def _group(module: str) -> str:
    """The stage folder a module belongs to: graphopt.<folder>, graphopt.passes, graphopt.kernels, or the top."""
    parts = module.split(".")
    if module in TOP_FILES:
        return "top"
    if module in ("graphopt.errors", "graphopt.__main__"):  # under everything / `python -m graphopt`, above all
        return module
    return ".".join(parts[:2])


def _declared_imports(group: str, groups: set[str]) -> set[str]:
    """The groups a package's docstring says it may import ('May import: a, b.' / 'everything' / 'everything but x')."""
    doc = importlib.import_module(group).__doc__ or ""
    line = " ".join(doc.split("May import:")[1].split()) if "May import:" in doc else None
    assert line, f"{group}'s docstring does not say what it may import ('May import: ...')"
    if line.startswith("everything but"):
        banned = {n.strip(" .,") for n in line[len("everything but"):].split("(")[0].split(",")}
        return groups - banned
    if line.startswith("everything"):
        return set(groups)
    return {n.strip(" .,") for n in line.split(",")}


def group_graph() -> nx.DiGraph:
    """Stage folder -> the stage folders its modules import (imports inside one folder do not count)."""
    graph = nx.DiGraph()
    for source, target in import_graph().edges:
        a, b = _group(source), _group(target)
        graph.add_nodes_from((a, b))
        if a != b:
            graph.add_edge(a, b, example=f"{source} -> {target}")
    return graph


def test_the_stage_folders_import_only_what_their_docstrings_allow():
    graph = group_graph()
    folders = {g for g in graph.nodes if g not in ("top", "graphopt.errors", "graphopt.__main__")}
    assert {"graphopt.capture", "graphopt.analysis", "graphopt.pipeline", "graphopt.passes", "graphopt.export",
            "graphopt.result", "graphopt.graph", "graphopt.cli"} <= folders
    for folder in sorted(folders):
        allowed = _declared_imports(folder, set(graph.nodes) - {folder}) | {"graphopt.errors"}
        undeclared = {t: graph.edges[folder, t]["example"] for t in graph.successors(folder) if t not in allowed}
        assert not undeclared, f"{folder} imports what its docstring does not allow: {undeclared}"


def test_the_stage_folders_form_no_cycle():
    graph = group_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, [[graph.edges[a, b]["example"] for a, b in zip(c, c[1:] + c[:1])] for c in cycles[:3]]
    # the flow the README describes: capture and analysis below the pipeline, the result on top of export
    assert nx.has_path(graph, "graphopt.result", "graphopt.export")
    assert not nx.has_path(graph, "graphopt.capture", "graphopt.pipeline")
    assert not nx.has_path(graph, "graphopt.analysis", "graphopt.passes")


def test_a_checkout_on_sys_path_does_not_shadow_hugging_faces_kernels_package():
    """transformers >= 5.25 imports Hugging Face's ``kernels`` at start-up; ``python -m`` from a checkout puts its root,
    and so graphopt's kernels/ directory, first on sys.path. The top-level name must still reach the real package."""
    code = "import kernels, graphopt.kernels; print(kernels.__file__); print(graphopt.kernels.QuantLinear.__module__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    if importlib.machinery.PathFinder.find_spec("kernels", elsewhere) is None:
        assert run.returncode != 0 and "graphopt.kernels" in run.stderr, run.stderr
        return
    assert run.returncode == 0, run.stderr
    real, ours = run.stdout.split()
    assert Path(real).resolve() != ROOT / "kernels" / "__init__.py" and "site-packages" in real, real
    assert ours == "graphopt.kernels.modules"
