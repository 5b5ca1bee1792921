"""Issue 18: one state machine that is obeyed. Every state change goes through
``Store.set_state`` (checked against ``domain.states``' table, recorded as an event);
no module writes a relationship's state another way — this test reads the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vmreplica
from vmreplica.domain.relationship import Relationship
from vmreplica.domain.states import _TRANSITIONS, State, check_transition
from vmreplica.errors import Conflict
from vmreplica.service.store import Store

SRC = Path(vmreplica.__file__).parent
STORE = SRC / "service" / "store.py"


def _state_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """Places that write a relationship's state without the state machine: a call of
    update_relationship/add_relationship... with ``state=``, ``x.update(state=...)`` on
    a dict of changes, or ``x["state"] = ...``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            kw = {k.arg for k in node.keywords}
            if name in ("update_relationship", "update", "_write_relationship") and "state" in kw:
                found.append((node.lineno, f"{name}(state=...)"))
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if (isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                        and t.slice.value == "state"):
                    found.append((node.lineno, '[\"state\"] = ...'))
    return sorted(found)


def test_no_module_writes_a_state_outside_the_state_machine():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == STORE:
            continue
        for line, what in _state_writes(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(SRC)}:{line}: {what}")
    # A dict that *reports* a state (an API answer) is built with a literal, not assigned;
    # anything found here writes one: route it through Store.set_state.
    assert offenders == [], "\n".join(offenders)


def test_the_scan_finds_a_direct_write():
    bad = ast.parse('host.store.update_relationship(vm, state="replicating")\n'
                    'changes.update(state="error")\nchanges["state"] = "x"\n')
    assert [w for _, w in _state_writes(bad)] == ["update_relationship(state=...)",
                                                  "update(state=...)", '[\"state\"] = ...']


def test_every_state_has_its_moves():
    assert set(_TRANSITIONS) == set(State)
    assert all(set(v) <= set(State) for v in _TRANSITIONS.values())
    # What the product does (issue 18 found these bypassing the table):
    check_transition(State.FAILED_OVER, State.RESYNCHRONIZING)          # reverse
    check_transition(State.PREPARED_FOR_FAILOVER, State.RESYNCHRONIZING)  # the old primary
    check_transition(State.REPLICATING, State.STANDBY)                  # a DR link moved
    with pytest.raises(Conflict):
        check_transition(State.FAILED_OVER, State.REPLICATING)
    with pytest.raises(Conflict):
        check_transition(State.STANDBY, State.REPLICATING)


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    s.add_relationship(Relationship(vm="web1", id="r1", role="replica", peer="a",
                                    peer_address="127.0.0.1:1", state="replicating"))
    yield s
    s.close()


def test_update_relationship_refuses_a_state(store):
    with pytest.raises(ValueError, match="set_state"):
        store.update_relationship("web1", state="failed_over")
    assert store.relationship("web1").state == "replicating"


def test_set_state_checks_writes_and_records(store):
    store.set_state("web1", State.FAILOVER_IN_PROGRESS, why="operator", failover={"x": 1})
    rel = store.relationship("web1")
    assert rel.state == "failover_in_progress" and rel.failover == {"x": 1}
    msgs = [e["message"] for e in store.events("web1") if e["kind"] == "state"]
    assert msgs == ["replicating -> failover_in_progress: operator"]
    store.set_state("web1", State.FAILOVER_IN_PROGRESS, epoch=2)     # staying: no event
    assert len([e for e in store.events("web1") if e["kind"] == "state"]) == 1
    assert store.relationship("web1").epoch == 2


def test_an_impossible_move_writes_nothing(store):
    store.set_state("web1", State.FAILOVER_IN_PROGRESS)
    store.set_state("web1", State.FAILED_OVER)
    with pytest.raises(Conflict, match="failed_over to replicating"):
        store.set_state("web1", State.REPLICATING, last_error="x")
    rel = store.relationship("web1")
    assert rel.state == "failed_over" and rel.last_error is None
