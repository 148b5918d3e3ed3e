"""The package's import structure: no circles, and no import from a lower layer to a higher one.

Layers, lowest first: ops (kernels and the paged-cache view) < model < engine < server, with
harmony (chat format) beside the engine. Every import counts, including ones inside functions
and under TYPE_CHECKING: a circle hidden in a function is still a circle in the design.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moerun"

# importer prefix -> prefixes it must not import
FORBIDDEN = {
    "moerun.ops": ("moerun.model", "moerun.engine", "moerun.server", "moerun.harmony",
                   "moerun.llm"),
    "moerun.model": ("moerun.engine", "moerun.server", "moerun.harmony", "moerun.llm"),
    "moerun.engine": ("moerun.server", "moerun.harmony", "moerun.llm"),
    "moerun.harmony": ("moerun.server", "moerun.engine", "moerun.model", "moerun.ops"),
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the moerun modules it imports (a name imported from a package counts as the
    submodule when one exists)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("moerun")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moerun"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_sees_a_circle_and_a_clean_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    graph = import_graph()
    assert graph["moerun.ops.backend"] and graph["moerun.model.gpt_oss"]  # the parse saw imports
    bad = [f"{m} imports {t}" for m, targets in graph.items() for t in sorted(targets)
           for layer, banned in FORBIDDEN.items()
           if (m == layer or m.startswith(layer + ".")) and t.startswith(banned)]  # fmt: skip
    assert not bad, "\n".join(bad)
