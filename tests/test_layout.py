"""The package's shape: no import circles among fcsp_hook's modules (lazy imports included),
and the observer's duties meet only through the host state, never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fcsp_hook"
DUTIES = (
    "tenants",
    "memory",
    "shares",
    "clocks",
    "backends",
    "reaper",
    "crosscheck",
    "backstop",
    "publish",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every fcsp_hook module this one imports, at the top or inside functions; imports
    under `if TYPE_CHECKING:` are for mypy only and never run."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for stmt in node.body
        for child in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: _imports(path, modules) - {name} for name, path in paths.items()}
    # Importing a submodule runs its package's __init__ first, but that is not a circle
    # unless the __init__ imports back; packages are kept as nodes like any module.
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles() -> None:
    """Each module's imports, lazy ones included, lead down, never back to itself."""
    graph = _graph()
    assert len(graph) > 40
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_observers_duties_do_not_import_each_other() -> None:
    graph = _graph()
    names = {f"fcsp_hook.observer.{d}" for d in DUTIES}
    assert names <= set(graph)
    for duty in names:
        assert not graph[duty] & names, f"{duty} imports {graph[duty] & names}"
        assert "fcsp_hook.observer.daemon" not in graph[duty]


def test_a_circle_is_found_where_there_is_one() -> None:
    """The check itself: a graph with a circle is reported with the circle."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
