"""
The agent's module graph: acyclic, and each layer imports only what it may.

Every ``ctrlagent`` module is parsed with ``ast`` (nothing is imported), and
every import in it counts: top-level ones, those under ``if TYPE_CHECKING:``
and those inside functions, since each is a dependency a reader has to follow.
An import of ``ctrlagent.a.b.name`` is an edge to the longest prefix that is a
module (``ctrlagent.a.b``); importing a submodule is not counted as an edge to
its package's ``__init__``.

The rules are those of docs/design/reshape-plan.md section 1 and
docs/ARCHITECTURE.md.  Today's exceptions are listed below with their reason;
a listed exception that no longer occurs fails too, so the lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ctrlagent"

# Today's import cycles (each as the set of its modules, without "ctrlagent.").
# Other packages of issue 11 remove them; the list is then emptied.
ALLOWED_CYCLES: list[frozenset[str]] = []

# Today's breaches of the layer rules: (importer, imported) -> why it is still there.
ALLOWED_VIOLATIONS: dict[tuple[str, str], str] = {}

# Open to every layer: settings, coded errors, the startup-error texts (pure,
# used by whoever binds a port or opens the store) and the package's version.
# They are leaves: they import nothing of the agent but each other.
OPEN_TO_ALL = ("config", "errors", "records", "startup", "")


def _within(module: str, *prefixes: str) -> bool:
    """True if ``module`` is one of ``prefixes`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Rule:
    """One layer rule: modules that ``applies`` to may import only what ``allows``."""

    name: str
    applies: Callable[[str], bool]
    allows: Callable[[str], bool]


def _only(*prefixes: str, open_to_all: bool = True) -> Callable[[str], bool]:
    allowed = prefixes + (OPEN_TO_ALL if open_to_all else ())

    def allows(target: str) -> bool:
        return target in allowed or _within(target, *prefixes)

    return allows


def _never(*prefixes: str) -> Callable[[str], bool]:
    return lambda target: not _within(target, *prefixes)


def _all_of(*checks: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda target: all(check(target) for check in checks)


# Where a module of the servers domain lives that is part of a Server (all but
# the set of servers itself and the package face).
def _server_part(module: str) -> bool:
    return _within(module, "servers") and module not in ("servers", "servers.manager")


RULES: list[Rule] = [
    Rule(
        "wire/ is pure: it imports only errors, events and itself",
        lambda m: _within(m, "wire"),
        _only("wire", "events"),
    ),
    Rule(
        "config, errors, records and startup are leaves: open to all, they import only each other",
        lambda m: m in OPEN_TO_ALL,
        _only(open_to_all=True),
    ),
    Rule(
        "engine/interface.py imports only errors and records",
        lambda m: m == "engine.interface",
        _only("errors", "records", open_to_all=False),
    ),
    Rule(
        "engine/docker/ never imports servers, actions, api or panel",
        lambda m: _within(m, "engine.docker"),
        _never("servers", "actions", "api", "panel"),
    ),
    Rule(
        "servers/ never imports engine.docker, actions, api or panel",
        lambda m: _within(m, "servers"),
        _never("engine.docker", "actions", "api", "panel"),
    ),
    Rule(
        "a Server and its parts never import servers.manager",
        _server_part,
        _never("servers.manager"),
    ),
    Rule(
        "actions/ imports only interfaces, wire, work, servers.spec",
        lambda m: _within(m, "actions"),
        _only("actions", "interfaces", "wire", "work", "asyncs", "events", "servers.spec"),
    ),
    Rule(
        "api/ imports only wire, interfaces, events, work",
        lambda m: _within(m, "api"),
        _only("api", "wire", "interfaces", "events", "work", "asyncs"),
    ),
    Rule(
        "panel/ imports only wire, interfaces, events, work",
        lambda m: _within(m, "panel"),
        _only("panel", "wire", "interfaces", "events", "work", "asyncs"),
    ),
    Rule(
        "testing/ imports only interfaces and records (wire, events, engine.interface)",
        lambda m: _within(m, "testing"),
        _only("testing", "interfaces", "engine.interface", "wire", "events", "work", "asyncs"),
    ),
    Rule(
        "cli/ is a client of the API: it imports only config, errors and itself",
        lambda m: _within(m, "cli"),
        _only("cli"),
    ),
    Rule(
        "only tap.py sees everything: nothing imports it",
        lambda m: m != "tap",
        _never("tap"),
    ),
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``ctrlagent/a/b.py`` -> ``a.b``; ``ctrlagent/a/__init__.py`` -> ``a``; the root -> ``""``."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_names(
    source: str, module: str, is_package: bool, modules: Iterable[str] = ()
) -> set[str]:
    """
    Every dotted name that ``source`` imports, absolute, anywhere in the file.

    ``from a import b`` gives ``a.b`` when that is one of ``modules`` (or
    outside ``ctrlagent``, where ``b`` may be a module too), else ``a``.
    """
    known = {"ctrlagent." + m if m else "ctrlagent" for m in modules}
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["ctrlagent", *module.split(".")] if module else ["ctrlagent"]
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            ours = parent == "ctrlagent" or parent.startswith("ctrlagent.")
            for alias in node.names:
                full = "{}.{}".format(parent, alias.name)
                if not ours:
                    names.update((parent, full))
                else:
                    names.add(full if full in known else parent)
    return names


def _target(name: str, modules: Iterable[str]) -> str | None:
    """The module of ``ctrlagent`` that the dotted ``name`` denotes (longest prefix), if any."""
    if name != "ctrlagent" and not name.startswith("ctrlagent."):
        return None
    parts = name.split(".")[1:]
    known = set(modules)
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return ""


def _modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the ``ctrlagent`` modules it imports (names without ``ctrlagent.``)."""
    files = _modules(package)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        source = path.read_text(encoding="utf-8")
        targets = set()
        for name in imported_names(source, module, _is_package(path), files):
            target = _target(name, files)
            if target is not None and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(
    graph: Mapping[str, Iterable[str]], rules: Iterable[Rule]
) -> dict[tuple[str, str], str]:
    """(importer, imported) -> the rule it breaks."""
    out: dict[tuple[str, str], str] = {}
    for rule in rules:
        for module, targets in graph.items():
            if not rule.applies(module):
                continue
            for target in targets:
                if not rule.allows(target):
                    out.setdefault((module, target), rule.name)
    return out


# -- the checker itself -------------------------------------------------------


def test_checker_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_checker_finds_a_planted_violation() -> None:
    graph = {
        "wire.frames": {"wire.json", "errors", "servers.manager"},
        "servers.console": {"servers.manager", "engine.interface"},
        "api.app": {"interfaces", "actions.registry"},
        "engine.interface": {"errors", "config"},
    }
    assert violations(graph, RULES) == {
        ("wire.frames", "servers.manager"): RULES[0].name,
        ("servers.console", "servers.manager"): (
            "a Server and its parts never import servers.manager"
        ),
        ("api.app", "actions.registry"): "api/ imports only wire, interfaces, events, work",
        ("engine.interface", "config"): "engine/interface.py imports only errors and records",
    }


def test_checker_reads_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "ctrlagent"
    (package / "wire").mkdir(parents=True)
    (package / "servers").mkdir()
    for name in ("__init__.py", "wire/__init__.py", "servers/__init__.py", "errors.py"):
        (package / name).write_text('"""x"""\n')
    (package / "servers" / "manager.py").write_text('"""x"""\n')
    (package / "wire" / "frames.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ctrlagent import errors\n"
        "if TYPE_CHECKING:\n"
        "    from ..servers.manager import ServerManager\n"
        "def late():\n"
        "    import ctrlagent.servers\n"
    )
    graph = import_graph(package)
    assert graph["wire.frames"] == {"errors", "servers.manager", "servers"}


# -- the agent ----------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_the_known_edges(graph: dict[str, set[str]]) -> None:
    # A check that reads nothing passes everything: make sure it reads.
    assert len(graph) > 40
    # tap.py's imports are function-local, work.py's are at the top.
    assert {"work", "config", "servers.manager", "panel.link"} <= graph["tap"]
    assert "config" in graph["work"]


def test_the_module_graph_has_no_cycle_but_the_listed_ones(graph: dict[str, set[str]]) -> None:
    found = set(cycles(graph))
    allowed = set(ALLOWED_CYCLES)
    assert found - allowed == set(), "new import cycle(s)"
    assert allowed - found == set(), "gone: remove from ALLOWED_CYCLES"


def test_every_layer_imports_only_what_it_may(graph: dict[str, set[str]]) -> None:
    found = violations(graph, RULES)
    new = {edge: rule for edge, rule in found.items() if edge not in ALLOWED_VIOLATIONS}
    assert new == {}, "layer rule broken"
    gone = set(ALLOWED_VIOLATIONS) - set(found)
    assert gone == set(), "gone: remove from ALLOWED_VIOLATIONS"


def test_only_tap_imports_the_global_reactor() -> None:
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        names = imported_names(source, module_name(path), _is_package(path))
        if "twisted.internet.reactor" in names:
            importers.add(module_name(path))
    assert importers == {"tap"}


def test_the_agent_never_imports_the_test_rig() -> None:
    # tests/ is not in the wheel: an import of it would fail on a real node.
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        names = imported_names(source, module_name(path), _is_package(path))
        if any(n == "tests" or n.startswith("tests.") for n in names):
            importers.add(module_name(path))
    assert importers == set()
