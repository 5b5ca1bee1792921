"""Issue 18: the relationship is a typed noun (domain.relationship) and the state store
is the only code that reads and writes its rows.

- ``test_no_module_indexes_a_relationship`` reads the source of every module of the
  package but ``service/store.py`` (AST, nothing imported) and fails on any
  ``X["key"]`` (read, write or delete) or ``X.get("key", ...)`` with a string key where
  ``X`` is a relationship: a name called ``rel``, ``relationship``, ``main`` or
  ``existing``; a name the same function binds to the result of a call that returns
  one (``store.relationship(...)``, ``update_relationship``, ``set_state``,
  ``primary_row`` and the private lookups ``_rel``, ``own_relationship``,
  ``_replica_rel``, ``_startable``), or loops over ``store.relationships()`` with; a
  parameter annotated ``Relationship``; or such a call itself
  (``store.relationship(vm)["state"]``). Dicts that are not relationships (a peer's
  answer, a request body, the replica's view of its primary) are not named so and stay
  dicts.
- the rest: the dataclass (every default in ``Settings``, once), the store's checks
  (an unknown field is refused, a row of an older version loads) and a round trip.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
from pathlib import Path

import pytest

import vmreplica
from vmreplica.domain.relationship import (
    DEFAULTS,
    FREQUENCY_TEXT,
    POINT_INTERVAL_TEXT,
    Relationship,
    Settings,
)
from vmreplica.domain.states import State
from vmreplica.service.store import Store

SRC = Path(vmreplica.__file__).parent
STORE = SRC / "service" / "store.py"

REL_NAMES = {"rel", "relationship", "main", "existing"}
REL_CALLS = {"relationship", "update_relationship", "set_state", "primary_row", "_rel",
             "own_relationship", "_own_relationship", "_replica_rel", "_startable"}


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        f = node.func
        return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return None


def _names_in(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


class _Scan(ast.NodeVisitor):
    """Finds string-key indexing of relationships, function by function."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str]] = []
        self.scopes: list[set[str]] = [set(REL_NAMES)]

    def _bound(self, body: ast.AST) -> set[str]:
        """Names this scope binds to a relationship (not looking into nested functions)."""
        names: set[str] = set()
        todo = list(ast.iter_child_nodes(body))
        while todo:
            n = todo.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None and \
                    _call_name(n.value) in REL_CALLS:
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    names |= _names_in(t)
            elif isinstance(n, (ast.For, ast.comprehension)) and \
                    _call_name(n.iter) == "relationships":
                names |= _names_in(n.target)
            todo.extend(ast.iter_child_nodes(n))
        return names

    def _function(self, node) -> None:
        names = set(self.scopes[-1]) | self._bound(node)
        for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            if a.annotation is not None and "Relationship" in ast.unparse(a.annotation):
                names.add(a.arg)
        self.scopes.append(names)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Module(self, node: ast.Module) -> None:
        self.scopes[-1] |= self._bound(node)
        self.generic_visit(node)

    def _is_rel(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.scopes[-1]
        return _call_name(node) in REL_CALLS

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str) and \
                self._is_rel(node.value):
            self.found.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "get" and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and self._is_rel(f.value):
            self.found.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)


def _indexings(source: str) -> list[str]:
    scan = _Scan()
    scan.visit(ast.parse(source))
    return [what for _, what in sorted(scan.found)]


def test_no_module_indexes_a_relationship():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == STORE:
            continue
        scan = _Scan()
        scan.visit(ast.parse(path.read_text(), str(path)))
        offenders += [f"{path.relative_to(SRC)}:{line}: {what}"
                      for line, what in sorted(scan.found)]
    # Read a field as an attribute (rel.frequency); change one with
    # Store.update_relationship / Store.set_state.
    assert offenders == [], "\n".join(offenders)


def test_the_scan_finds_each_kind_of_indexing():
    src = '''
def a(host, vm):
    rel = host.store.relationship(vm)
    x = rel["state"]
    y = rel.get("history", 4)
    rel["epoch"] = 2
def b(host):
    for r in host.store.relationships():
        print(r["vm"])
    return [x.get("peer") for x in host.store.relationships()]
def c(host, vm):
    found = _rel(host, vm)
    return found["id"], host.store.relationship(vm)["state"]
def d(link: Relationship, answer: dict):
    return link["peer"], answer["peer"]
def e(answer, body):
    found = answer["found"]
    return answer["state"], body.get("history"), found["x"]
'''
    assert _indexings(src) == [
        "rel['state']", "rel.get('history', 4)", "rel['epoch']", "r['vm']", "x.get('peer')",
        "found['id']", "host.store.relationship(vm)['state']", "link['peer']"]


# -- the dataclass ------------------------------------------------------------------------
def _rel(**kw) -> Relationship:
    return Relationship(**{"vm": "web1", "id": "r1", "role": "primary", "peer": "site-b",
                           "state": "ready_for_initial", **kw})


def test_every_setting_has_its_default_once():
    assert _rel().settings() == DEFAULTS == Settings()
    assert (DEFAULTS.frequency, DEFAULTS.history, DEFAULTS.point_interval,
            DEFAULTS.app_every, DEFAULTS.compression, DEFAULTS.mode, DEFAULTS.max_stall) == \
        (300, 4, 3600, 0, "zstd", "periodic", 5.0)
    assert (FREQUENCY_TEXT, POINT_INTERVAL_TEXT) == ("5m", "1h")
    # A new primary row, `enable`'s defaults, the API's and the CLI's: the same values.
    from vmreplica.primary.relationship import enable, primary_row
    row = primary_row("web1", "r1", {"name": "site-b", "address": "h:1"},
                      State.READY_FOR_INITIAL, 1, ["disk0"])
    assert row.settings() == DEFAULTS and row.cycle == -1 and row.bitmap is None
    sig = inspect.signature(enable).parameters
    for name in ("compression", "security_tag", "history", "app_every", "resync_window",
                 "mode", "max_stall"):
        assert sig[name].default == getattr(DEFAULTS, name), name
    assert (sig["frequency"].default, sig["point_interval"].default) == \
        (FREQUENCY_TEXT, POINT_INTERVAL_TEXT)
    from vmreplica.cli import replication_cmd
    p = argparse.ArgumentParser()
    replication_cmd.register(p.add_subparsers())
    args = p.parse_args(["enable", "web1", "--replica", "h:1"])
    assert (args.frequency, args.compression, args.recovery_history, args.point_interval,
            args.app_consistent_every, args.mode, args.max_stall) == \
        (FREQUENCY_TEXT, DEFAULTS.compression, DEFAULTS.history, POINT_INTERVAL_TEXT,
         DEFAULTS.app_every, DEFAULTS.mode, DEFAULTS.max_stall)


def test_a_relationship_is_frozen_and_names_its_fields():
    rel = _rel()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rel.history = 7                                  # type: ignore[misc]
    with pytest.raises(TypeError):
        Relationship(vm="web1", id="r1", role="primary", peer="b", state="x", histroy=3)  # type: ignore[call-arg]
    assert json.loads(json.dumps(rel.to_dict()))["history"] == 4
    assert set(rel.data()) == Relationship.field_names() - set(Relationship.COLUMNS)


# -- the store ----------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def test_round_trip_through_the_store(store):
    rel = _rel(disks=["disk0", "disk1"], history=7, mode="continuous",
               chains={"disk0": ["/a/0", "/a/1"]}, seed={"cycle": 3, "folder": "/m"},
               holders=["a", "b"])
    store.add_relationship(rel)
    back = store.relationship("web1")
    assert isinstance(back, Relationship) and back.created_at > 0
    assert dataclasses.replace(back, created_at=0.0, updated_at=0.0) == rel
    assert store.relationships() == [back]
    got = store.update_relationship("web1", frequency=30, test={"vm": "web1-test"})
    assert got == store.relationship("web1")
    assert (got.frequency, got.test, got.history) == (30, {"vm": "web1-test"}, 7)
    got = store.set_state("web1", "initial_in_progress", cycle=0)
    assert (got.state, got.cycle) == ("initial_in_progress", 0)


def test_an_unknown_field_is_refused_and_nothing_is_written(store):
    store.add_relationship(_rel())
    with pytest.raises(TypeError, match="histroy"):
        store.update_relationship("web1", histroy=3)
    with pytest.raises(TypeError, match="bogus"):
        store.set_state("web1", "initial_in_progress", bogus=1)
    with pytest.raises(TypeError, match="vm"):
        store.update_relationship("web1", vm="other")
    rel = store.relationship("web1")
    assert rel.state == "ready_for_initial" and rel.history == 4
    assert [e for e in store.events("web1") if e["kind"] == "state"] == []


def test_a_row_of_an_older_version_loads(store, caplog):
    """Rows written before the typed relationship hold keys nothing reads any more (a
    cycle's ``progress``, say): they load without them, and the next write drops them."""
    store.add_relationship(_rel())
    data = json.loads(store._all("SELECT data FROM relationships")[0]["data"])
    data.update(progress={"done": 1}, some_old_key=True, history=9)
    del data["mode"]                                       # a key an old row never had
    store._exec("UPDATE relationships SET data=?", (json.dumps(data),))
    with caplog.at_level(logging.INFO, logger="vmreplica.store"):
        rel = store.relationship("web1")
        store.relationship("web1")
    assert rel.history == 9 and rel.mode == DEFAULTS.mode
    said = [r.getMessage() for r in caplog.records if "no longer used" in r.getMessage()]
    assert said == ["relationship web1: ignoring fields no longer used: progress, some_old_key"]
    store.update_relationship("web1", frequency=30)
    data = json.loads(store._all("SELECT data FROM relationships")[0]["data"])
    assert "progress" not in data and "some_old_key" not in data and data["history"] == 9


def test_points_and_cycles_are_typed_rows(store):
    from vmreplica.domain.health import CycleRecord
    from vmreplica.domain.points import Point, after_merge
    store.add_point("web1", 1, 100.0, "crash", 1)
    store.add_point("web1", 2, 200.0, "app", 2)
    pts = store.points("web1")
    assert [(p.id, p.point_time, p.kind, p.layer) for p in pts] == \
        [(1, 100.0, "crash", 1), (2, 200.0, "app", 2)]
    assert all(isinstance(p, Point) and p.vm == "web1" and p.created_at > 0 for p in pts)
    store.replace_points("web1", after_merge(pts))
    assert [(p.id, p.layer, p.created_at) for p in store.points("web1")] == \
        [(2, 1, pts[1].created_at)]
    row = store.start_cycle("web1", 5, "delta")
    (running,) = store.cycles("web1")
    assert isinstance(running, CycleRecord) and (running.ok, running.finished_at) == (None, None)
    store.finish_cycle(row, True, raw_bytes=10, wire_bytes=4, extents=2)
    (done,) = store.cycles("web1")
    assert (done.id, done.cycle, done.kind, done.ok, done.raw_bytes, done.wire_bytes,
            done.extents, done.error) == (row, 5, "delta", 1, 10, 4, 2, None)


def test_every_field_a_module_writes_is_a_field():
    """What the store would refuse at run time, found in the source: each keyword of an
    update_relationship / set_state / primary_row / Relationship(...) call, and each
    string key of a dict literal spread into one with ``**``, names a field."""
    fields = Relationship.field_names()
    calls = {"update_relationship", "set_state", "primary_row", "Relationship"}
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        dicts = {}                       # name -> string keys of the dict literals bound to it
        for n in ast.walk(tree):
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict):
                for t in n.targets:
                    if isinstance(t, ast.Name):
                        dicts.setdefault(t.id, set()).update(
                            k.value for k in n.value.keys
                            if isinstance(k, ast.Constant) and isinstance(k.value, str))
        for n in ast.walk(tree):
            if _call_name(n) not in calls:
                continue
            assert isinstance(n, ast.Call)
            names = {k.arg for k in n.keywords if k.arg} - {"why"}
            for k in n.keywords:
                if k.arg is None and isinstance(k.value, ast.Name):
                    names |= dicts.get(k.value.id, set())
            wrong += [f"{path.relative_to(SRC)}:{n.lineno}: {name}"
                      for name in sorted(names - fields)]
    assert wrong == [], "\n".join(wrong)


def test_from_dict_builds_what_the_constructor_builds():
    """from_dict skips the frozen dataclass's __init__ (the scheduler decodes every
    relationship twice a second): the same value, fresh containers, the same refusals."""
    values = {"vm": "vm1", "id": "r1", "role": "primary", "peer": "site-b",
              "state": State.REPLICATING.value, "disks": ["vda"], "chains": {"vda": ["x"]},
              "frequency": 300, "failover": {"at": 1.0}}
    rel, unknown = Relationship.from_dict({**values, "gone": 1})
    assert unknown == ["gone"]
    assert rel == Relationship(**values)
    assert dataclasses.asdict(rel) == dataclasses.asdict(Relationship(**values))
    a, _ = Relationship.from_dict(values)
    b, _ = Relationship.from_dict(values)
    assert a.excluded is not b.excluded and a.network_map is not b.network_map
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.state = "x"          # type: ignore[misc]
    with pytest.raises(TypeError):
        Relationship.from_dict({k: v for k, v in values.items() if k != "peer"})
