"""Issue 20: the cycle history in the store (service.store): the schema migration, the
rollup of old cycles into per-hour aggregates, the pruning of events, and `measure`
across the boundary. A real SQLite store in a temporary directory; times injected."""

from __future__ import annotations

import sqlite3

from vmreplica.service.store import SCHEMA_VERSION, Store


def test_an_older_database_gets_the_new_columns(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO settings VALUES ('schema_version', '1');
        CREATE TABLE cycles (
            id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, cycle INTEGER NOT NULL,
            kind TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, ok INTEGER,
            raw_bytes INTEGER DEFAULT 0, wire_bytes INTEGER DEFAULT 0,
            extents INTEGER DEFAULT 0, error TEXT);
        INSERT INTO cycles(vm, cycle, kind, started_at, finished_at, ok)
            VALUES ('v', 1, 'delta', 100.0, 101.0, 1);
    """)
    db.commit()
    db.close()
    store = Store(path)
    assert store.get_setting("schema_version") == SCHEMA_VERSION
    [old] = store.cycles("v")
    assert old.slot is None and old.finished_at == 101.0
    row = store.start_cycle("v", 2, "delta", slot=130.0)
    store.finish_cycle(row, True, 10, 5, 1)
    assert store.cycles("v")[0].slot == 130.0
    store.close()
    Store(path).close()          # a second open finds nothing to do
