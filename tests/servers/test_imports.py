"""
The servers package's import graph: a ``Server`` and its parts never import
the manager (``ast`` imports, ``TYPE_CHECKING`` blocks included), the package
has no import cycle, and it speaks the container engine only through the seam
(``ctrlagent.engine.interface``), never a runtime's module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ctrlagent.servers

PACKAGE = Path(ctrlagent.servers.__file__).parent


def imports(path: Path) -> set[str]:
    """The ``ctrlagent.servers`` modules ``path`` imports, at any depth of its tree."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "ctrlagent.servers":
                found.update("ctrlagent.servers." + alias.name for alias in node.names)
            elif node.module.startswith("ctrlagent.servers."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ctrlagent.servers."))
    return found


def graph() -> dict[str, set[str]]:
    return {
        "ctrlagent.servers." + path.stem: imports(path)
        for path in PACKAGE.glob("*.py")
        if path.stem != "__init__"
    }


def test_the_server_and_its_parts_never_import_the_manager() -> None:
    edges = graph()
    assert "ctrlagent.servers.manager" in edges
    for module, targets in edges.items():
        if module != "ctrlagent.servers.manager":
            assert "ctrlagent.servers.manager" not in targets, module


# Import cycles allowed by name, while a move is under way (none now).
ALLOWED_CYCLES: set[tuple[str, str]] = set()


def test_the_servers_package_has_no_import_cycle() -> None:
    edges = graph()
    for source, target in ALLOWED_CYCLES:
        edges[source].discard(target)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for target in edges.get(module, ()):
            visit(target, (*path, module))
        done.add(module)

    for module in edges:
        visit(module, ())


def engine_imports(path: Path) -> set[str]:
    """The ``ctrlagent.engine`` modules ``path`` imports, at any depth of its tree."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "ctrlagent.engine":
                found.update("ctrlagent.engine." + alias.name for alias in node.names)
            elif node.module.startswith("ctrlagent.engine."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ctrlagent.engine"))
    return found


def test_the_servers_package_speaks_only_the_engine_seam() -> None:
    seen: set[str] = set()
    for path in PACKAGE.glob("*.py"):
        targets = engine_imports(path)
        seen |= targets
        assert targets <= {"ctrlagent.engine.interface"}, (path.name, targets)
    assert "ctrlagent.engine.interface" in seen  # the walk finds the imports it judges
