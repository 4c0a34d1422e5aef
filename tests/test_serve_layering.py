"""The serving modules form no import cycle: the API router and the web app depend on the
shared state, never on each other or on the app that composes them.

Reads the imports of every module in chatforge/serve with ``ast`` (all of them: top level,
inside functions, under ``TYPE_CHECKING``), so a cycle hidden from the interpreter by a lazy
or type-only import still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chatforge.serve

SERVE = Path(chatforge.serve.__file__).parent
PACKAGE = "chatforge.serve"


def serve_imports(path: Path) -> set[str]:
    """The chatforge.serve modules that ``path`` imports (by module name: ``app``, ``state``, ...)."""
    here = path.stem
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                module = ".".join([PACKAGE, *([module] if module else [])]) if node.level == 1 else "chatforge"
            names = [f"{module}.{a.name}" for a in node.names] if module == PACKAGE else [module]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                module = name.split(".")[2]
                if (SERVE / f"{module}.py").is_file():
                    found.add(module)
    return found - {here}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: serve_imports(p) for p in sorted(SERVE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    mod = tmp_path / "probe.py"
    mod.write_text("from typing import TYPE_CHECKING\nimport chatforge.serve.engine\n"
                   "from chatforge.serve import fields\nfrom . import limits\nfrom .state import ServeState\n"
                   "if TYPE_CHECKING:\n    from chatforge.serve.app import ServedModel\n"
                   "def f():\n    from chatforge.serve.web import mount_web\n")
    assert serve_imports(mod) == {"engine", "fields", "limits", "state", "app", "web"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_serve_modules_have_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among chatforge/serve modules: " + " -> ".join(cycle or [])
    assert {"app", "state", "openai_api", "web", "fields", "limits", "engine", "cli"} <= set(graph)


def test_routers_depend_on_state_not_on_each_other_or_the_app():
    graph = import_graph()
    assert "state" in graph["openai_api"] and "state" in graph["web"] and "fields" in graph["web"]
    assert "fields" in graph["openai_api"]
    for router in ("openai_api", "web"):
        assert "app" not in graph[router], router
    assert "web" not in graph["openai_api"] and "openai_api" not in graph["web"]
    for leaf in ("state", "fields", "limits"):  # the shared modules import no router and no app
        assert not graph[leaf] & {"app", "openai_api", "web", "cli"}, (leaf, graph[leaf])
