"""Issue 18: the layers of docs/architecture.md, checked on the source. The module import
graph is read from every module's syntax tree — every import, at the top of a module or
inside a function (and under ``TYPE_CHECKING``) — and:

(a) no two modules import each other, directly or round a loop;
(b) every import from one package into another goes down the table ``ALLOWED`` below,
    which docs/architecture.md ("Layers") and each package's docstring ("May import
    ...") state too (checked here as well: change the three together);
(c) no module imports another module's private (``_name``) helper, nor reaches one
    through a module it imported (``module._name``): what two modules share is public,
    in the lower of the two or in a module below both.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vmreplica

SRC = Path(vmreplica.__file__).resolve().parent
DOCS = SRC.parents[1] / "docs" / "architecture.md"

# What each layer may import, top to bottom: a package, or one module of a package. The
# package root (``vmreplica.__version__``) may be imported from anywhere.
ALLOWED: dict[str, set[str]] = {
    # A thin client of the daemon. `init` makes a home, `serve` runs the daemon and hands
    # it the dashboard, `cluster setup` writes Pacemaker's configuration on this node.
    "cli": {"service.home", "service.daemon", "web.app", "cluster.pacemaker", "domain",
            "errors"},
    # A UI over the service: its operations and read models, never the layers below it.
    "web": {"service", "transport", "domain", "errors"},
    "service": {"cluster", "primary", "replica", "tracking", "hypervisor", "transport",
                "qemutools", "domain", "errors"},
    "cluster": {"primary", "replica", "tracking", "hypervisor", "transport", "qemutools",
                "domain", "errors"},
    # The two sides of a relationship: neither imports the other (what spans both, such
    # as reverse and remove, is composed by service or cluster).
    "primary": {"tracking", "hypervisor", "transport", "qemutools", "domain", "errors"},
    "replica": {"tracking", "hypervisor", "transport", "qemutools", "domain", "errors"},
    "tracking": {"hypervisor", "qemutools", "domain", "errors"},
    "hypervisor": {"qemutools", "domain", "errors"},
    "transport": {"domain", "errors"},
    "qemutools": {"errors"},
    "domain": {"errors"},
    "errors": set(),
}


# -- the graph -------------------------------------------------------------------------

def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to it ("" is the root)."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _absolute(name: str) -> str:
    return f"vmreplica.{name}" if name else "vmreplica"


def _relative(dotted: str) -> str | None:
    """``vmreplica.a.b`` -> ``a.b`` (root: ""); None for anything else."""
    if dotted == "vmreplica":
        return ""
    return dotted[len("vmreplica."):] if dotted.startswith("vmreplica.") else None


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


class Import:
    def __init__(self, source: str, target: str, name: str | None, line: int):
        self.source, self.target, self.name, self.line = source, target, name, line

    def __repr__(self) -> str:
        what = f" ({self.name})" if self.name else ""
        return f"{_absolute(self.source)}:{self.line} -> {_absolute(self.target)}{what}"


def _imports(module: str, path: Path) -> tuple[list[Import], list[Import]]:
    """The imports of ``module`` between vmreplica's modules, and its uses of another
    module's private names (``from m import _x``, ``m._x``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: list[Import] = []
    private: list[Import] = []
    bound: dict[str, str] = {}          # a name this module binds to one of the modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                if node.level - 1 > len(base):
                    continue
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                rel = _relative(node.module or "")
                if rel is None:
                    continue
                target = rel
            for alias in node.names:
                sub = _join(target, alias.name)
                if sub in MODULES:                    # `from package import module`
                    edges.append(Import(module, sub, None, node.lineno))
                    bound[alias.asname or alias.name] = sub
                    if alias.name.startswith("_"):
                        private.append(Import(module, sub, alias.name, node.lineno))
                    continue
                edges.append(Import(module, target, alias.name, node.lineno))
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(Import(module, target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                rel = _relative(alias.name)
                if rel is None:
                    continue
                edges.append(Import(module, rel, None, node.lineno))
                if alias.asname:
                    bound[alias.asname] = rel
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            private.append(Import(module, bound[node.value.id], node.attr, node.lineno))
    edges = [e for e in edges if e.target != module and e.target in MODULES]
    private = [p for p in private if p.target != module]
    return edges, private


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> str:
    """The package a module belongs to (its first component; ``errors`` for errors.py).
    (The test and demo harness lives outside the package: test_harness_outside.py.)"""
    return module.split(".")[0]


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        group.append(top)
                        if top == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def _loop(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One import loop through the first module of ``group`` (breadth-first)."""
    start = group[0]
    members = set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(edges[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return group


def _allows(layer: str, target: str) -> bool:
    return any(target == a or target.startswith(a + ".") for a in ALLOWED[layer])


# -- the checks ------------------------------------------------------------------------

def test_the_graph_is_read():
    """Not vacuous: the reader finds the imports it must (top-level, function-level,
    `from package import module`, relative to a package)."""
    edges = {m: {e.target for e in GRAPH[m][0]} for m in MODULES}
    assert "primary.follow" in edges["service.scheduler"]           # inside a function
    assert "transport.wire" in edges["primary.cycle"]               # from .. import wire
    assert "errors" in edges["domain.states"]
    assert sum(len(t) for t in edges.values()) > 300


def test_no_module_imports_itself_round_a_loop():
    edges = {m: {e.target for e in GRAPH[m][0]} for m in MODULES}
    loops = [" -> ".join(_absolute(m) for m in _loop(g, edges))
             + (f" (one loop of {len(g)} modules: {', '.join(g)})" if len(g) > 2 else "")
             for g in _strongly_connected(edges)]
    assert not loops, "import loops between modules:\n  " + "\n  ".join(loops)


def test_imports_go_down_the_layers():
    wrong = []
    for module, (edges, _) in GRAPH.items():
        if not module:
            continue
        layer = _layer(module)
        for e in edges:
            there = _layer(e.target)
            if there == layer or not e.target:            # within a package; the root
                continue
            if layer not in ALLOWED or there not in ALLOWED:
                wrong.append(f"{e}: a package the table does not know "
                             f"({layer if layer not in ALLOWED else there})")
            elif not _allows(layer, e.target):
                wrong.append(f"{e}: {layer} may import "
                             f"{', '.join(sorted(ALLOWED[layer])) or 'nothing'}")
    assert not wrong, "imports against the layers:\n  " + "\n  ".join(wrong)


def test_no_private_names_across_modules():
    found = [repr(p) for _, private in GRAPH.values() for p in private]
    assert not found, ("private names used across modules (make them public where they "
                       "belong, or move them below both):\n  " + "\n  ".join(found))


def test_the_table_is_a_layering():
    """Every package is in the table, every entry names a module or package that exists,
    and the table itself has no loop (so it orders the packages)."""
    packages = {_layer(m) for m in MODULES if m}
    assert packages == set(ALLOWED), "the table and the packages differ"
    for layer, allowed in ALLOWED.items():
        for a in allowed:
            assert a in MODULES, f"{layer}: {a} names no module or package"
    edges = {layer: {a.split(".")[0] for a in allowed} for layer, allowed in ALLOWED.items()}
    assert not _strongly_connected(edges)
    assert not any(layer in allowed for layer, allowed in edges.items())


def _names(text: str) -> set[str]:
    """The `code` names of a phrase, each without a trailing slash; what it says in
    parentheses (why) does not count."""
    text = re.sub(r"\([^)]*\)", "", text)
    return {n.rstrip("/") for part in re.findall(r"`([^`]+)`", text) for n in part.split("/")
            if n.rstrip("/")}


def test_the_architecture_document_states_the_table():
    text = DOCS.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`").rstrip("/").removesuffix(".py")] = _names(cells[2])
    assert rows == ALLOWED


def test_each_package_docstring_states_its_row():
    wrong = []
    for layer, allowed in ALLOWED.items():
        path = SRC / layer / "__init__.py"
        if not path.exists():
            continue                                     # a module (errors.py)
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        # "May import `a`, `b` (why) and `c`" up to the end of the sentence or a ";".
        said = re.search(r"\bmay import (.*?)(?:[.;]\s|[.;]$)", doc, re.DOTALL | re.IGNORECASE)
        if said is None or _names(said.group(1)) != allowed:
            wrong.append(f"{layer}/__init__.py says "
                         f"{sorted(_names(said.group(1))) if said else 'nothing'}, "
                         f"the table {sorted(allowed)}")
    assert not wrong, "\n".join(wrong)
