"""The package's shape: imports run one way, no module is too big, each says its concern.

Every import inside ``replica_router`` counts, at module level, inside functions and
under ``TYPE_CHECKING`` alike: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import replica_router

PACKAGE = Path(replica_router.__file__).parent
MAX_LINES = 600
# The core, lowest first: a module may import only modules before it. The package
# face (__init__), the command line, the demo, metrics, otel and testing sit above it all.
CORE = (
    "_exceptions",
    "_discovery",
    "_urls",
    "_settings",
    "_psycopg",
    "_drivers",
    "_retry",
    "_pool",
    "_nodes",
    "_selection",
    "_health",
    "_status",
    "_consistency",
    "_otel",
    "_tracing",
    "_checkout",
    "_reads",
    "_writes",
    "_units",
    "_lifecycle",
    "_membership",
    "_status_page",
    "fastapi",
    "_router",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The ``replica_router`` modules that ``path`` imports, resolved to module names."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("replica_router"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("replica_router"):
                continue
            # ``from . import fastapi`` names a module; ``from ._x import y`` a member.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {m for m in found if m in MODULES and m != here}


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports_of(p) for p in FILES}


def test_there_is_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_core_modules_import_only_those_below_them() -> None:
    order = {f"replica_router.{name}": i for i, name in enumerate(CORE)}
    assert set(order) <= MODULES, sorted(set(order) - MODULES)
    for name, rank in order.items():
        above = sorted(dep for dep in GRAPH[name] if order.get(dep, len(CORE)) >= rank)
        assert not above, f"{name} imports {above}, which sit above it"


def test_only_the_package_face_and_its_users_import_the_router() -> None:
    allowed = ("replica_router", "replica_router.cli", "replica_router.metrics")
    for name, deps in GRAPH.items():
        if "replica_router._router" in deps:
            assert name in allowed or name.startswith(
                ("replica_router._demo", "replica_router.testing")
            ), name


def test_modules_are_small_and_say_what_they_are_for() -> None:
    for path in FILES:
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines"
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{path.relative_to(PACKAGE)} has no docstring"


def test_the_router_is_a_small_facade() -> None:
    assert len((PACKAGE / "_router.py").read_text().splitlines()) < 400
