"""The package's own import graph has no circle, counting imports at the top of a module and inside
functions alike (inner imports are how circles went unseen before)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ffasynth"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ("ffasynth", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, known: set[str], here: str, is_package: bool = False) -> set[str]:
    """Every package module a file imports anywhere (top level and inside functions): `from a.b
    import c` counts a.b.c when c is a module, else a.b; `import a.b` counts a.b. Relative imports
    are resolved against `here`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # `from . import x` in a/b.py is relative to a; in a/__init__.py, to a itself.
                parts = here.split(".")
                anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else a name from a.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        # A package's own ancestors are imported before it anyway: no edge.
        found.update(n for n in names if n in known and n != here and not here.startswith(n + "."))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    known = set(files)
    return {
        name: imported_modules(ast.parse(path.read_text()), known, name, path.name == "__init__.py")
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None. Iterative depth-first search."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_find_cycle_sees_a_circle_through_an_inner_import(tmp_path):
    package = tmp_path / "ffasynth"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("from . import a\n")
    (package / "models" / "a.py").write_text("from ffasynth.models import b\n")
    (package / "models" / "b.py").write_text("def f():\n    from ffasynth.models.c import g\n")
    (package / "models" / "c.py").write_text("from .a import something\n")
    cycle = find_cycle(import_graph(package))
    assert cycle is not None and set(cycle) == {"ffasynth.models.a", "ffasynth.models.b", "ffasynth.models.c"}
    assert import_graph(package)["ffasynth.models"] == {"ffasynth.models.a"}  # relative to the package
    (package / "models" / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "ffasynth.pipeline" in graph
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail("import circle: " + " → ".join(cycle))
