"""The package's import graph: no cycle, and no module importing a higher layer (docs/architecture.md).

Every import counts, including those under `TYPE_CHECKING` and inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import epdserve

PACKAGE = Path(epdserve.__file__).parent

# Low to high; a module may import its own layer or a lower one. Dev `tools` may import anything
# and nothing in the package may import them.
LAYERS: list[set[str]] = [
    {"protocol", "config", "utils"},
    {"media"},
    {"kernels"},
    {"attention"},
    {"models"},
    {"engine"},
    {"transfer", "runtime"},
    {"processor", "worker", "frontend"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
TOOLS = "tools"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules of the package that `path` imports (relative imports resolved)."""
    this = module_name(path).split(".")
    package = this if path.name == "__init__.py" else this[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "epdserve"}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_top_level_module_has_a_layer():
    tops = {top(m) for m in graph()} - {"", TOOLS}
    assert tops <= set(RANK), f"give these a layer in LAYERS and docs/architecture.md: {sorted(tops - set(RANK))}"


def test_no_module_imports_a_higher_layer_or_the_dev_tools():
    wrong = []
    for module, imported in graph().items():
        if top(module) in ("", TOOLS):
            continue
        for other in imported:
            if top(other) == TOOLS:
                wrong.append(f"{module} imports the dev tool {other}")
            elif top(other) and RANK[top(other)] > RANK[top(module)]:
                wrong.append(f"{module} ({top(module)}) imports {other} ({top(other)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(edges[module]):
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
