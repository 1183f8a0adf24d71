"""The package's layout, as ARCHITECTURE.md states it: no import cycle, nothing below the CLI imports it, a small top
level, no module over 450 lines, and every module opening with a docstring that says its job.

Imports are read from the source (every import statement, inside functions and under TYPE_CHECKING too), so a lazy
import counts as a dependency: it is one, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vqdiff_cli"
MAX_TOP_LEVEL = 12
MAX_LINES = 450
# The layers of ARCHITECTURE.md, bottom up: a module imports only from its own wing and from lower layers.
LAYERS = (
    ("errors", "version"),
    ("options", "files", "config"),
    ("device", "images", "metadata"),
    ("masks", "distributed"),
    ("models", "diffusion"),
    ("checkpoint",),
    ("pipeline",),
    ("bench", "datasets", "train"),
    ("cli",),
    ("__init__", "__main__"),
)
RANK = {wing: rank for rank, wings in enumerate(LAYERS) for wing in wings}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that the module `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports the module; `from mod import name`, mod
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checks_see_a_cycle_and_a_cli_import(tmp_path):
    """The graph is read correctly: a made-up package with a cycle (one side lazy) and a CLI import."""
    pkg = tmp_path / "vqdiff_cli"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""x"""\n')
    (pkg / "cli" / "__init__.py").write_text('"""x"""\n')
    (pkg / "cli" / "app.py").write_text('"""x"""\nfrom .. import a\n')
    (pkg / "a.py").write_text('"""x"""\nfrom .b import f\n')
    (pkg / "b.py").write_text('"""x"""\ndef f():\n    from . import a\n')
    lazy_cli = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vqdiff_cli.cli.app\n"
    (pkg / "c.py").write_text('"""x"""\n' + lazy_cli)
    graph = import_graph(pkg)
    assert graph["vqdiff_cli.cli.app"] == {"vqdiff_cli.a"}
    assert cycles(graph) == [["vqdiff_cli.a", "vqdiff_cli.b"]]
    assert graph["vqdiff_cli.c"] == {"vqdiff_cli.cli.app"}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def wing(name: str) -> str:
    """vqdiff_cli.pipeline.editing -> pipeline; vqdiff_cli.masks -> masks; vqdiff_cli -> __init__."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_wings_import_only_from_below():
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        for target in targets
        if wing(target) != wing(name) and RANK[wing(target)] >= RANK[wing(name)]
    )
    assert upward == []
    assert set(RANK) >= {wing(name) for name in modules()}, "a new wing or top-level module: give it a layer"


def test_nothing_below_the_cli_imports_it():
    """Only the command line (and `python -m vqdiff_cli`, which runs it) may import vqdiff_cli.cli."""
    wrong = {
        name: sorted(m for m in targets if m == "vqdiff_cli.cli" or m.startswith("vqdiff_cli.cli."))
        for name, targets in import_graph().items()
        if not name.startswith("vqdiff_cli.cli") and name != "vqdiff_cli.__main__"
    }
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_top_level_stays_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_short_and_says_its_job(name):
    path = modules()[name]
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES, f"{path} has {len(text.splitlines())} lines"
    tree = ast.parse(text)
    doc = ast.get_docstring(tree)
    assert doc and len(doc.split()) >= 5, f"{path} opens with no docstring that says its job"
    assert isinstance(tree.body[0], ast.Expr), f"{path}: the docstring is not the first statement"
