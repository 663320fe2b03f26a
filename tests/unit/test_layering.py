"""The import graph of src/clusterctl, read with `ast` (nothing of the package is imported):
no import cycles, pure layers that import nothing that does I/O, and no import from a lower
layer up to a higher one. Every import counts, module-level or inside a function (lazy); an
import under `if TYPE_CHECKING:` is kept apart: it closes no runtime cycle, but it is reported,
and it counts for the purity and layer rules (TYPE_CHECKING_COUNTS_FOR_RULES)."""

from __future__ import annotations

import ast
import textwrap
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Final

import pytest

REPO: Final = Path(__file__).resolve().parents[2]
SRC: Final = REPO / "src"
PACKAGE: Final = "clusterctl"

# Modules that must do no I/O. An entry covers that module and, when it is a package, all its
# submodules. An entry with no module on disk is a failure, not a skip.
PURE_MODULES: Final[tuple[str, ...]] = (
    "clusterctl.inventory",
    "clusterctl.planner",
    "clusterctl.render",
    "clusterctl.layout",
    "clusterctl.firewall",
    "clusterctl.engines",
    "clusterctl.deploy.changes",
    "clusterctl.deploy.ops",
    "clusterctl.deploy.desired",
)
# What a pure module may not import directly (each name covers its submodules too).
IO_IMPORTS: Final[tuple[str, ...]] = (
    "clusterctl.transport",
    "clusterctl.ui",
    "clusterctl.cli",
    "subprocess",
    "socket",
    "paramiko",
    "fabric",
    "httpx",
)

# The layers, lowest first: a module in layer i may not import a module in a layer j > i. A module
# belongs to the longest entry it falls under; a module under none is unconstrained.
LAYER_ORDER: Final[tuple[str, ...]] = (
    "clusterctl.errors",
    "clusterctl.inventory",
    "clusterctl.layout",
    "clusterctl.firewall",
    "clusterctl.models",
    "clusterctl.engines",
    "clusterctl.planner",
    "clusterctl.render",
    "clusterctl.transport",
    "clusterctl.deploy",
    "clusterctl.verify",
    "clusterctl.status",
    "clusterctl.bench",
    "clusterctl.ui",
    "clusterctl.cli",
)
# Packages outside the layers that still have imports they may not make.
UNLAYERED_RULES: Final[Mapping[str, tuple[str, ...]]] = {
    "clusterctl.router": ("clusterctl.deploy", "clusterctl.cli", "clusterctl.ui"),
}
# Whether an import under `if TYPE_CHECKING:` counts for PURE_MODULES / LAYER_ORDER / UNLAYERED_RULES.
TYPE_CHECKING_COUNTS_FOR_RULES: Final = True


# --- the graph ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported module, as resolved: `target` is a module of the package when it is internal,
    else the dotted name as written (`subprocess`, `paramiko.client`)."""

    importer: str
    target: str
    file: str
    line: int
    type_checking: bool
    lazy: bool
    written: str = ""  # the module as the import names it: `X` of `import X` / `from X import ...`
    resolved: bool = True  # False: an internal import of a module that is not there (moved, removed)

    def where(self) -> str:
        tags = [t for t, on in (("lazy", self.lazy), ("TYPE_CHECKING", self.type_checking)) if on]
        return f"{self.file}:{self.line}" + (f" ({', '.join(tags)})" if tags else "")


@dataclass(frozen=True, repr=False)
class ImportGraph:
    package: str
    modules: Mapping[str, Path]
    imports: tuple[Import, ...]

    def __repr__(self) -> str:  # short, for pytest's failure reports
        return f"<ImportGraph {self.package}: {len(self.modules)} modules, {len(self.imports)} imports>"

    def internal(self, target: str) -> bool:
        return under(target, self.package)

    def edges(self, *, type_checking: bool = False) -> dict[str, dict[str, list[Import]]]:
        """importer -> imported module -> the import sites, for imports inside the package; the
        TYPE_CHECKING ones only when asked for."""
        out: dict[str, dict[str, list[Import]]] = {m: {} for m in self.modules}
        for imp in self.imports:
            if self.internal(imp.target) and (type_checking or not imp.type_checking):
                out[imp.importer].setdefault(imp.target, []).append(imp)
        return out

    def type_checking_only(self) -> list[Import]:
        """The TYPE_CHECKING imports of a module the importer does not also import at run time."""
        runtime = self.edges()
        return [i for i in self.imports
                if i.type_checking and self.internal(i.target) and i.target not in runtime[i.importer]]

    def under(self, prefix: str) -> list[str]:
        return sorted(m for m in self.modules if under(m, prefix))

    def unresolved(self) -> list[Import]:
        """Imports of a module of the package that is not there (moved or removed): edges the graph misses."""
        return [i for i in self.imports if not i.resolved]


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@dataclass(frozen=True)
class _RawImport:
    module: str  # absolute dotted name of `import X` / the `X` of `from X import ...`
    names: tuple[str, ...]  # the names of `from X import a, b`; () for `import X`
    line: int
    type_checking: bool
    lazy: bool


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[_RawImport] = []
        self._functions = 0
        self._type_checking = False

    def _visit_all(self, stmts: Iterable[ast.stmt], *, type_checking: bool) -> None:
        outer, self._type_checking = self._type_checking, self._type_checking or type_checking
        for stmt in stmts:
            self.visit(stmt)
        self._type_checking = outer

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if _is_type_checking(test):
            self._visit_all(node.body, type_checking=True)
            self._visit_all(node.orelse, type_checking=False)
        elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and _is_type_checking(test.operand):
            self._visit_all(node.body, type_checking=False)
            self._visit_all(node.orelse, type_checking=True)
        else:
            self.generic_visit(node)

    def _add(self, module: str, names: tuple[str, ...], node: ast.stmt) -> None:
        self.found.append(_RawImport(module, names, node.lineno, self._type_checking, self._functions > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, (), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".") if self.package else []
            up = node.level - 1
            if up > len(parts):
                raise ValueError(f"relative import beyond the top package at line {node.lineno}")
            base = ".".join(parts[: len(parts) - up])
            module = f"{base}.{node.module}" if node.module and base else (node.module or base)
        else:
            module = node.module or ""
        self._add(module, tuple(a.name for a in node.names if a.name != "*"), node)


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_graph(root: Path, package: str, *, display_root: Path | None = None) -> ImportGraph:
    """The import graph of `package`, a directory under `root` (a src dir). File names in the import
    sites are relative to `display_root` (default: `root`)."""
    shown = display_root or root
    modules = {_module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}
    folders = {_module_name(root, p / "__init__.py") for p in (root / package).rglob("*")
               if p.is_dir() and p.name != "__pycache__"}

    def resolve(name: str) -> str:
        """An internal name that is no module (a removed one, say) falls back to its longest module prefix."""
        while under(name, package) and name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    imports: list[Import] = []
    for module, path in modules.items():
        collector = _Collector(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        try:
            file = str(path.relative_to(shown))
        except ValueError:
            file = str(path)
        for raw in collector.found:
            if not under(raw.module, package):
                imports.append(Import(module, raw.module, file, raw.line, raw.type_checking, raw.lazy, raw.module))
                continue
            # `from pkg import name`: the module pkg.name when there is one, else pkg itself (which must
            # then exist, as a module: a folder without __init__ has no names); `import pkg.mod`: pkg.mod,
            # a module or a folder
            found: dict[str, bool] = {}
            for n in raw.names or [""]:
                sub = f"{raw.module}.{n}"
                if n and sub in modules:
                    found.setdefault(sub, True)
                else:
                    ok = raw.module in modules or (not n and raw.module in folders)
                    target = resolve(raw.module)
                    found[target] = found.get(target, True) and ok
            for target, ok in found.items():
                imports.append(Import(module, target, file, raw.line, raw.type_checking, raw.lazy, raw.module, ok))
    return ImportGraph(package, modules, tuple(imports))


# --- cycles ---------------------------------------------------------------------------------------


def strongly_connected(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(components)


def _shortest_path(edges: Mapping[str, Iterable[str]], start: str, goal: str, within: set[str]) -> list[str] | None:
    """The shortest path start -> ... -> goal (at least one edge) through nodes of `within`."""
    came: dict[str, str] = {}
    queue = deque([start])
    seen: set[str] = set()
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, ())):
            if w not in within or w in seen:
                continue
            came[w] = v
            if w == goal:
                path = [goal]
                while path[-1] != start or len(path) == 1:
                    path.append(came[path[-1]])
                return path[::-1]
            seen.add(w)
            queue.append(w)
    return None


def find_cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """For every component of more than one module, or a module that imports itself: the shortest
    cycle through each of its modules, as paths [a, b, ..., a], without repeats."""
    cycles: dict[tuple[str, ...], list[str]] = {}
    for component in strongly_connected(edges):
        members = set(component)
        if len(component) == 1 and component[0] not in set(edges.get(component[0], ())):
            continue
        for v in component:
            path = _shortest_path(edges, v, v, members)
            assert path is not None
            ring = path[:-1]
            turn = ring.index(min(ring))
            ring = ring[turn:] + ring[:turn]
            cycles.setdefault(tuple(ring), [*ring, ring[0]])
    return list(cycles.values())


def describe_path(path: Sequence[str], edges: Mapping[str, Mapping[str, Sequence[Import]]]) -> str:
    lines = [" -> ".join(path)]
    for a, b in pairwise(path):
        lines.append(f"    {a} -> {b}: " + ", ".join(i.where() for i in edges[a][b]))
    return "\n".join(lines)


def cycle_report(graph: ImportGraph, *, type_checking: bool = False) -> list[str]:
    edges = graph.edges(type_checking=type_checking)
    return [describe_path(c, edges) for c in find_cycles(edges)]


# --- rules ----------------------------------------------------------------------------------------


def forbidden_imports(graph: ImportGraph, prefix: str, forbidden: Sequence[str], *, type_checking: bool) -> list[str]:
    """Direct imports by the modules under `prefix` of anything under one of `forbidden`."""
    return [f"{i.importer} imports {i.target} at {i.where()}"
            for i in graph.imports
            if under(i.importer, prefix) and (type_checking or not i.type_checking)
            and any(under(i.target, f) for f in forbidden)]


def layer_of(module: str, order: Sequence[str]) -> int | None:
    matches = [(len(prefix), k) for k, prefix in enumerate(order) if under(module, prefix)]
    return max(matches)[1] if matches else None


def upward_violations(graph: ImportGraph, layer: str, order: Sequence[str], *, type_checking: bool) -> list[str]:
    """Imports by the modules of `layer` of a module in a higher layer."""
    mine = order.index(layer)
    out = []
    for i in graph.imports:
        if layer_of(i.importer, order) != mine or (i.type_checking and not type_checking):
            continue
        theirs = layer_of(i.target, order) if graph.internal(i.target) else None
        if theirs is not None and theirs > mine:
            out.append(f"{i.importer} (layer {mine}, {layer}) imports {i.target} "
                       f"(layer {theirs}, {order[theirs]}) at {i.where()}")
    return out


def upward_reach(graph: ImportGraph, layer: str, order: Sequence[str]) -> list[str]:
    """Run-time import chains from a module of `layer` to a module of a higher layer that pass only
    through modules of that layer or lower ones, or outside the layers: what the direct rule misses
    when a chain goes through an unconstrained module."""
    mine = order.index(layer)
    edges = graph.edges()
    starts = [m for m in graph.modules if layer_of(m, order) == mine]
    came: dict[str, str] = {}
    queue = deque(starts)
    seen = set(starts)
    hits: list[str] = []
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v]):
            if w in seen:
                continue
            seen.add(w)
            came[w] = v
            theirs = layer_of(w, order)
            if theirs is not None and theirs > mine:
                path = [w]
                while path[-1] in came:
                    path.append(came[path[-1]])
                if len(path) > 2:  # a direct import is test_no_upward_import's to report
                    hits.append(describe_path(path[::-1], edges))
            else:
                queue.append(w)
    return hits


# --- the tree's tests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph(SRC, PACKAGE, display_root=REPO)


def test_no_import_cycle(graph: ImportGraph) -> None:
    runtime = cycle_report(graph)
    type_only = graph.type_checking_only()
    listed = "\n".join(f"    {i.importer} -> {i.target if i.resolved else i.written + ' (no such module)'}: {i.where()}"
                       for i in type_only) or "    (none)"
    print(f"TYPE_CHECKING-only imports (left out of the cycle check):\n{listed}")
    with_types = [c for c in cycle_report(graph, type_checking=True) if c not in runtime]
    if with_types:
        warnings.warn("import cycles closed only by TYPE_CHECKING imports:\n" + "\n".join(with_types), stacklevel=1)
    assert not runtime, (f"{len(runtime)} run-time import cycle(s):\n" + "\n".join(runtime)
                         + f"\nTYPE_CHECKING-only imports (left out of the cycle check):\n{listed}")


def test_every_internal_import_names_a_module(graph: ImportGraph) -> None:
    """Else the graph misses that edge (it falls back to the longest prefix that is a module)."""
    missing = [f"{i.importer} imports {i.written}, which is no module, at {i.where()}" for i in graph.unresolved()]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("entry", PURE_MODULES)
def test_pure_layers_do_no_io(graph: ImportGraph, entry: str) -> None:
    assert graph.under(entry), f"{entry} is listed in PURE_MODULES but there is no such module under src/"
    bad = forbidden_imports(graph, entry, IO_IMPORTS, type_checking=TYPE_CHECKING_COUNTS_FOR_RULES)
    assert not bad, f"{entry} is pure but imports I/O:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", LAYER_ORDER)
def test_no_upward_import(graph: ImportGraph, layer: str) -> None:
    bad = upward_violations(graph, layer, LAYER_ORDER, type_checking=TYPE_CHECKING_COUNTS_FOR_RULES)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", LAYER_ORDER)
def test_no_upward_reach_through_unlayered_modules(graph: ImportGraph, layer: str) -> None:
    """models must not get at planner through, say, clusterctl.units: the layer rule, transitively."""
    hits = upward_reach(graph, layer, LAYER_ORDER)
    assert not hits, f"{layer} reaches a higher layer:\n" + "\n".join(hits)


@pytest.mark.parametrize("prefix", sorted(UNLAYERED_RULES))
def test_unlayered_rules(graph: ImportGraph, prefix: str) -> None:
    assert graph.under(prefix), f"{prefix} is in UNLAYERED_RULES but there is no such module under src/"
    bad = forbidden_imports(graph, prefix, UNLAYERED_RULES[prefix], type_checking=TYPE_CHECKING_COUNTS_FOR_RULES)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("low", "high"), [
    ("clusterctl.models", "clusterctl.planner"),
    ("clusterctl.models", "clusterctl.engines"),
    ("clusterctl.inventory", "clusterctl.models"),
    ("clusterctl.engines", "clusterctl.planner"),
    ("clusterctl.planner", "clusterctl.render"),
    ("clusterctl.render", "clusterctl.transport"),
    ("clusterctl.transport", "clusterctl.deploy"),
    ("clusterctl.deploy", "clusterctl.cli"),
])
def test_layer_rule_forbids(low: str, high: str) -> None:
    """The rule table says what it is meant to: spot checks of LAYER_ORDER itself."""
    lo, hi = layer_of(f"{low}.x", LAYER_ORDER), layer_of(f"{high}.x", LAYER_ORDER)
    assert lo is not None and hi is not None and lo < hi


# --- the checker's own tests, on a package written to tmp_path ------------------------------------


def write_package(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


DEMO: Final = {
    "demo/__init__.py": "",
    "demo/a.py": """\
        from demo import b
        """,
    "demo/b.py": """\
        def later() -> None:
            from . import a
        """,
    "demo/c.py": """\
        import typing
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from demo.a import thing
        else:
            import demo.d
        if typing.TYPE_CHECKING:
            import demo.e
        """,
    "demo/d.py": """\
        import subprocess
        from demo.sub import helper, leaf
        """,
    "demo/e.py": "",
    "demo/sub/__init__.py": """\
        from .leaf import helper
        from .. import e
        """,
    "demo/sub/leaf.py": """\
        from ..e import nothing
        import demo.gone.module
        """,
}


def targets(graph: ImportGraph, module: str, *, type_checking: bool = False) -> set[str]:
    return set(graph.edges(type_checking=type_checking)[module])


def test_a_two_module_cycle_through_a_lazy_import_is_found(tmp_path: Path) -> None:
    write_package(tmp_path, DEMO)
    g = build_graph(tmp_path, "demo")
    assert set(g.modules) == {"demo", "demo.a", "demo.b", "demo.c", "demo.d", "demo.e", "demo.sub", "demo.sub.leaf"}
    assert targets(g, "demo.b") == {"demo.a"}
    (lazy,) = g.edges()["demo.b"]["demo.a"]
    assert lazy.lazy and not lazy.type_checking and lazy.where() == "demo/b.py:2 (lazy)"
    assert find_cycles(g.edges()) == [["demo.a", "demo.b", "demo.a"]]
    (report,) = cycle_report(g)
    assert report.splitlines() == ["demo.a -> demo.b -> demo.a",
                                   "    demo.a -> demo.b: demo/a.py:1",
                                   "    demo.b -> demo.a: demo/b.py:2 (lazy)"]


def test_a_type_checking_import_makes_no_runtime_edge(tmp_path: Path) -> None:
    write_package(tmp_path, DEMO)
    g = build_graph(tmp_path, "demo")
    assert targets(g, "demo.c") == {"demo.d"}  # the else branch of `if TYPE_CHECKING:` runs
    assert targets(g, "demo.c", type_checking=True) == {"demo.a", "demo.d", "demo.e"}
    assert [(i.target, i.line) for i in g.type_checking_only()] == [("demo.a", 5), ("demo.e", 9)]


def test_type_checking_imports_do_not_close_a_cycle(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "t/__init__.py": "",
        "t/x.py": "import t.y\n",
        "t/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import t.x\n",
    })
    g = build_graph(tmp_path, "t")
    assert cycle_report(g) == []
    assert [c.splitlines()[0] for c in cycle_report(g, type_checking=True)] == ["t.x -> t.y -> t.x"]


def test_names_resolve_to_modules_or_their_package(tmp_path: Path) -> None:
    write_package(tmp_path, DEMO)
    g = build_graph(tmp_path, "demo")
    assert targets(g, "demo.a") == {"demo.b"}  # `from demo import b`: b is a module
    assert targets(g, "demo.d") == {"demo.sub", "demo.sub.leaf"}  # helper is a name, leaf a module
    assert targets(g, "demo.sub") == {"demo.sub.leaf", "demo.e"}  # relative, from a package's __init__
    assert targets(g, "demo.sub.leaf") == {"demo.e", "demo"}  # `..e`; a module that is gone -> its prefix
    assert [i.target for i in g.imports if i.importer == "demo.d" and not g.internal(i.target)] == ["subprocess"]
    assert [(i.importer, i.written, i.target) for i in g.unresolved()] == [
        ("demo.sub.leaf", "demo.gone.module", "demo")]


def test_a_folder_without_init_holds_modules_but_no_names(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "n/__init__.py": "",
        "n/ns/mod.py": "",
        "n/user.py": "from n.ns import mod\nimport n.ns\nfrom n.ns import name\n",
    })
    g = build_graph(tmp_path, "n")
    assert [(i.written, i.target, i.resolved) for i in g.imports] == [
        ("n.ns", "n.ns.mod", True), ("n.ns", "n", True), ("n.ns", "n", False)]


def test_a_self_import_and_a_longer_cycle_are_found(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "s/__init__.py": "from s import Thing\n",  # a name, not a module: the package imports itself
        "s/p.py": "import s.q\n",
        "s/q.py": "def f() -> None:\n    from s import r\n",
        "s/r.py": "from .p import x\n",
    })
    g = build_graph(tmp_path, "s")
    assert find_cycles(g.edges()) == [["s", "s"], ["s.p", "s.q", "s.r", "s.p"]]


def test_the_rules_catch_what_they_should(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "k/__init__.py": "",
        "k/low.py": "from k import util\nimport socket\n",
        "k/util.py": "from k.high import x\n",
        "k/high.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from k import low\n",
        "k/side.py": "from k.high import x\n",
    })
    g = build_graph(tmp_path, "k")
    order = ("k.low", "k.high")
    assert forbidden_imports(g, "k.low", ("socket",), type_checking=False) == ["k.low imports socket at k/low.py:2"]
    assert forbidden_imports(g, "k.high", ("k.low",), type_checking=False) == []
    assert forbidden_imports(g, "k.high", ("k.low",), type_checking=True) == [
        "k.high imports k.low at k/high.py:3 (TYPE_CHECKING)"]
    assert upward_violations(g, "k.low", order, type_checking=True) == []  # only through k.util
    assert [h.splitlines()[0] for h in upward_reach(g, "k.low", order)] == ["k.low -> k.util -> k.high"]
    assert upward_violations(g, "k.high", order, type_checking=True) == []  # downward is fine
    assert upward_violations(build_graph(tmp_path, "k"), "k.low", ("k.low", "k.util"), type_checking=False) == [
        "k.low (layer 0, k.low) imports k.util (layer 1, k.util) at k/low.py:1"]
    assert forbidden_imports(g, "k.side", ("k.high",), type_checking=False) == [
        "k.side imports k.high at k/side.py:1"]
