"""The host's state: one SQLite database (WAL) in the host home.

Settings, pinned peers, pairing tokens, authorization entries, relationships, staged
cycles and the cycle history. One connection guarded by a lock: the daemon's threads
share it; every write is a short transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..domain.health import CycleRecord
from ..domain.history import CycleWindow, HourAggregate, aggregate, hour_of
from ..domain.points import Point
from ..domain.relationship import Relationship
from ..domain.states import State, check_transition

log = logging.getLogger("vmreplica.store")

SCHEMA_VERSION = 2

# What the cycle history keeps (README, "What is kept"): every cycle in full for a day,
# then per-hour aggregates (domain.history.HourAggregate) for 90 days.
CYCLES_KEPT = 24 * 3600
HOURS_KEPT = 90 * 86400

# Columns added after a table was first created: (table, column, its definition). A
# database made by an older version gets them at open (``_migrate``).
_ADDED_COLUMNS = [
    ("cycles", "slot", "REAL"),            # 2: the due time of a scheduled cycle's slot
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    name TEXT PRIMARY KEY, address TEXT, fingerprint TEXT NOT NULL UNIQUE,
    cert_pem TEXT NOT NULL, paired_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pair_tokens (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, expires_at REAL NOT NULL,
    used_at REAL);
CREATE TABLE IF NOT EXISTS authorizations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pattern TEXT NOT NULL UNIQUE, storage TEXT NOT NULL,
    tag TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS relationships (
    vm TEXT PRIMARY KEY, id TEXT NOT NULL, role TEXT NOT NULL, peer TEXT NOT NULL,
    peer_address TEXT, state TEXT NOT NULL, epoch INTEGER NOT NULL DEFAULT 1,
    data TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS staged_cycles (
    vm TEXT NOT NULL, cycle INTEGER NOT NULL, path TEXT NOT NULL, staged_at REAL NOT NULL,
    PRIMARY KEY (vm, cycle));
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, cycle INTEGER NOT NULL,
    kind TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, ok INTEGER,
    raw_bytes INTEGER DEFAULT 0, wire_bytes INTEGER DEFAULT 0, extents INTEGER DEFAULT 0,
    error TEXT, slot REAL);
CREATE INDEX IF NOT EXISTS cycles_vm ON cycles (vm, started_at);
CREATE TABLE IF NOT EXISTS cycle_hours (
    vm TEXT NOT NULL, hour REAL NOT NULL, cycles INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, raw_bytes INTEGER NOT NULL DEFAULT 0,
    wire_bytes INTEGER NOT NULL DEFAULT 0, seconds_sum REAL NOT NULL DEFAULT 0,
    seconds_max REAL NOT NULL DEFAULT 0, bytes_max INTEGER NOT NULL DEFAULT 0,
    late INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (vm, hour));
CREATE TABLE IF NOT EXISTS recovery_points (
    vm TEXT NOT NULL, id INTEGER NOT NULL, point_time REAL NOT NULL, kind TEXT NOT NULL,
    layer INTEGER NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (vm, id));
CREATE TABLE IF NOT EXISTS vm_tags (
    vm TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (vm, tag));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, vm TEXT, kind TEXT NOT NULL,
    message TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._dropped: set[tuple[str, tuple[str, ...]]] = set()
        # the running aggregates of each VM's last 12 h of cycles (domain.history),
        # loaded from the rows the first time a VM is measured, then kept as cycles
        # start and end: health and status never go through the rows again
        self._windows: dict[str, CycleWindow] = {}
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database an older version made up to ``SCHEMA_VERSION``: new tables
        come from ``_SCHEMA`` (CREATE ... IF NOT EXISTS), new columns from here."""
        with self.transaction():
            for table, column, kind in _ADDED_COLUMNS:
                have = {r["name"] for r in self._all(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._exec(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            if (self.get_setting("schema_version") or 0) < SCHEMA_VERSION:
                self.set_setting("schema_version", SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- low level -------------------------------------------------------------------
    def _exec(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple | list = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def transaction(self):
        return _Tx(self)

    @contextlib.contextmanager
    def unsynced(self):
        """Commits made inside are not fsynced (``synchronous=NORMAL``): the WAL keeps them
        in order, and the next synced commit makes them durable with it. For records a
        crash may lose because something durable redoes them (a cycle recorded as applied
        while its staged copy is kept: replica.checkpoint). Holds the store meanwhile, so
        no other thread's commit goes unsynced."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                yield self
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    # -- settings --------------------------------------------------------------------
    def get_setting(self, key: str, default: Any = None) -> Any:
        rows = self._all("SELECT value FROM settings WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        self._exec("INSERT INTO settings(key, value) VALUES(?, ?) "
                   "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                   (key, json.dumps(value)))

    # -- peers -----------------------------------------------------------------------
    def add_peer(self, name: str, address: str | None, fingerprint: str, cert_pem: str) -> None:
        with self.transaction():
            self._exec("DELETE FROM peers WHERE name=? OR fingerprint=?", (name, fingerprint))
            self._exec("INSERT INTO peers(name, address, fingerprint, cert_pem, paired_at) "
                       "VALUES(?,?,?,?,?)", (name, address, fingerprint, cert_pem, time.time()))

    def peers(self) -> list[dict]:
        return self._all("SELECT * FROM peers ORDER BY name")

    def peer_by_fingerprint(self, fingerprint: str) -> dict | None:
        rows = self._all("SELECT * FROM peers WHERE fingerprint=?", (fingerprint,))
        return rows[0] if rows else None

    def peer_by_address(self, address: str) -> dict | None:
        rows = self._all("SELECT * FROM peers WHERE address=?", (address,))
        return rows[0] if rows else None

    def peer(self, name: str) -> dict | None:
        rows = self._all("SELECT * FROM peers WHERE name=?", (name,))
        return rows[0] if rows else None

    def remove_peer(self, name: str) -> bool:
        return self._exec("DELETE FROM peers WHERE name=?", (name,)).rowcount > 0

    # -- pairing tokens --------------------------------------------------------------
    def add_token(self, token_id: str, secret_hash: str, expires_at: float) -> None:
        self._exec("DELETE FROM pair_tokens WHERE expires_at < ?", (time.time() - 86400,))
        self._exec("INSERT INTO pair_tokens(id, secret_hash, expires_at) VALUES(?,?,?)",
                   (token_id, secret_hash, expires_at))

    def token(self, token_id: str) -> dict | None:
        """A pairing token as it stands (not marked used)."""
        rows = self._all("SELECT * FROM pair_tokens WHERE id=?", (token_id,))
        return rows[0] if rows else None

    def use_token(self, token_id: str) -> dict | None:
        """Mark a token used and return it, or None if unknown. Single use: atomic."""
        with self.transaction():
            rows = self._all("SELECT * FROM pair_tokens WHERE id=?", (token_id,))
            if not rows:
                return None
            self._exec("UPDATE pair_tokens SET used_at=? WHERE id=? AND used_at IS NULL",
                       (time.time(), token_id))
            return rows[0]

    # -- authorization ---------------------------------------------------------------
    def add_authorization(self, pattern: str, storage: str, tag: str) -> None:
        self._exec("INSERT INTO authorizations(pattern, storage, tag) VALUES(?,?,?) "
                   "ON CONFLICT(pattern) DO UPDATE SET storage=excluded.storage, tag=excluded.tag",
                   (pattern, storage, tag))

    def authorizations(self) -> list[dict]:
        return self._all("SELECT pattern, storage, tag FROM authorizations ORDER BY id")

    def remove_authorization(self, pattern: str) -> bool:
        return self._exec("DELETE FROM authorizations WHERE pattern=?", (pattern,)).rowcount > 0

    # -- relationships ---------------------------------------------------------------
    # The only code that reads and writes relationship rows: nine columns (Relationship.
    # COLUMNS) and every other field in `data` (JSON). Callers get and give Relationship
    # values (domain.relationship).
    def add_relationship(self, rel: Relationship) -> None:
        now = time.time()
        rel = dataclasses.replace(rel, created_at=rel.created_at or now, updated_at=now)
        cols = {k: getattr(rel, k) for k in Relationship.COLUMNS}
        cols["data"] = json.dumps(rel.data())
        names = ",".join(cols)
        marks = ",".join("?" for _ in cols)
        self._exec(f"INSERT INTO relationships({names}) VALUES({marks})", list(cols.values()))

    def relationship(self, vm: str) -> Relationship | None:
        rows = self._all("SELECT * FROM relationships WHERE vm=?", (vm,))
        return self._unpack(rows[0]) if rows else None

    def relationships(self) -> list[Relationship]:
        return [self._unpack(r) for r in self._all("SELECT * FROM relationships ORDER BY vm")]

    def update_relationship(self, vm: str, **changes: Any) -> Relationship:
        """Change a relationship's fields, never its state (``set_state`` does that). A
        name that is not a field of Relationship raises TypeError and writes nothing."""
        if "state" in changes:
            raise ValueError(f"the state of {vm} changes through Store.set_state only")
        return self._write_relationship(vm, changes)

    def set_state(self, vm: str, new: State | str, *, why: str | None = None,
                  **changes: Any) -> Relationship:
        """The one way a relationship's state changes: the move is checked against the
        table of ``domain.states`` (an impossible one raises Conflict and writes nothing),
        written with ``changes`` in one transaction, and recorded as a `state` event when
        the state is a new one (with ``why`` when given)."""
        _check_fields(vm, changes)
        with self.transaction():
            rel = self.relationship(vm)
            if rel is None:
                raise KeyError(vm)
            old = rel.state
            nxt = check_transition(old, new)
            rel = self._write_relationship(vm, {**changes, "state": nxt.value})
            if nxt.value != old:
                self.add_event("state", f"{old} -> {nxt.value}" + (f": {why}" if why else ""),
                               vm)
            return rel

    def _write_relationship(self, vm: str, changes: dict[str, Any]) -> Relationship:
        _check_fields(vm, changes)
        with self.transaction():
            rows = self._all("SELECT * FROM relationships WHERE vm=?", (vm,))
            if not rows:
                raise KeyError(vm)
            rel = dataclasses.replace(self._unpack(rows[0]), **changes,
                                      updated_at=time.time())
            sets: dict[str, Any] = {k: getattr(rel, k) for k in Relationship.COLUMNS
                                    if k != "vm"}
            sets["data"] = json.dumps(rel.data())
            assign = ",".join(f"{k}=?" for k in sets)
            self._exec(f"UPDATE relationships SET {assign} WHERE vm=?", [*sets.values(), vm])
            return rel

    def _unpack(self, row: dict) -> Relationship:
        data = json.loads(row.pop("data") or "{}")
        rel, unknown = Relationship.from_dict({**data, **row})
        if unknown:
            # Keys an older version wrote: dropped (the next write leaves them out).
            # Said once per VM and set of keys, not at every read.
            said = (rel.vm, tuple(unknown))
            if said not in self._dropped:
                self._dropped.add(said)
                log.info("relationship %s: ignoring fields no longer used: %s", rel.vm,
                         ", ".join(unknown))
        return rel

    def remove_relationship(self, vm: str) -> None:
        with self.transaction():
            self._exec("DELETE FROM relationships WHERE vm=?", (vm,))
            self._exec("DELETE FROM staged_cycles WHERE vm=?", (vm,))
            self._exec("DELETE FROM cycles WHERE vm=?", (vm,))
            self._exec("DELETE FROM cycle_hours WHERE vm=?", (vm,))
            self._exec("DELETE FROM recovery_points WHERE vm=?", (vm,))
            self._windows.pop(vm, None)

    # -- staged cycles (replica) -----------------------------------------------------
    def add_staged(self, vm: str, cycle: int, path: str) -> None:
        self._exec("INSERT OR REPLACE INTO staged_cycles(vm, cycle, path, staged_at) "
                   "VALUES(?,?,?,?)", (vm, cycle, path, time.time()))

    def staged(self, vm: str | None = None) -> list[dict]:
        if vm is None:
            return self._all("SELECT * FROM staged_cycles ORDER BY vm, cycle")
        return self._all("SELECT * FROM staged_cycles WHERE vm=? ORDER BY cycle", (vm,))

    def remove_staged(self, vm: str, cycle: int) -> None:
        self._exec("DELETE FROM staged_cycles WHERE vm=? AND cycle=?", (vm, cycle))

    # -- recovery points -------------------------------------------------------------
    def add_point(self, vm: str, point_id: int, point_time: float, kind: str, layer: int) -> None:
        self._exec("INSERT INTO recovery_points(vm, id, point_time, kind, layer, created_at) "
                   "VALUES(?,?,?,?,?,?)", (vm, point_id, point_time, kind, layer, time.time()))

    def points(self, vm: str) -> list[Point]:
        return [Point(**r) for r in
                self._all("SELECT * FROM recovery_points WHERE vm=? ORDER BY id", (vm,))]

    def replace_points(self, vm: str, points: list[Point]) -> None:
        """Write the whole list of a VM's points at once (after a merge or a failover)."""
        with self.transaction():
            self._exec("DELETE FROM recovery_points WHERE vm=?", (vm,))
            for p in points:
                self._exec("INSERT INTO recovery_points(vm, id, point_time, kind, layer, "
                           "created_at) VALUES(?,?,?,?,?,?)",
                           (vm, p.id, p.point_time, p.kind, p.layer,
                            p.created_at or time.time()))

    # -- cycle history ---------------------------------------------------------------
    # Every cycle in full for CYCLES_KEPT (`cycles`), older ones rolled up into per-hour
    # aggregates (`cycle_hours`) kept for HOURS_KEPT (roll_up, run hourly by the
    # scheduler); health and status read the running aggregates (cycle_stats).
    def start_cycle(self, vm: str, cycle: int, kind: str, slot: float | None = None,
                    at: float | None = None) -> int:
        """Record a cycle that starts (``at``: when, default now)."""
        started = time.time() if at is None else at
        with self._lock:
            cur = self._exec("INSERT INTO cycles(vm, cycle, kind, started_at, slot) "
                             "VALUES(?,?,?,?,?)", (vm, cycle, kind, started, slot))
            assert cur.lastrowid is not None            # (an INSERT sets it)
            window = self._windows.get(vm)
            if window is not None:
                window.add(CycleRecord(id=cur.lastrowid, vm=vm, cycle=cycle, kind=kind,
                                       started_at=started, slot=slot))
            return cur.lastrowid

    def finish_cycle(self, row_id: int, ok: bool, raw_bytes=0, wire_bytes=0, extents=0,
                     error: str | None = None, at: float | None = None) -> None:
        """Record how cycle ``row_id`` ended (``at``: when, default now)."""
        ended = time.time() if at is None else at
        with self._lock:
            self._exec("UPDATE cycles SET finished_at=?, ok=?, raw_bytes=?, wire_bytes=?, "
                       "extents=?, error=? WHERE id=?",
                       (ended, int(ok), raw_bytes, wire_bytes, extents, error, row_id))
            for window in self._windows.values():
                if window.holds(row_id):
                    window.finish(row_id, finished_at=ended, ok=int(ok),
                                  raw_bytes=raw_bytes, wire_bytes=wire_bytes,
                                  extents=extents, error=error)
                    break

    def cycles(self, vm: str, limit: int = 100) -> list[CycleRecord]:
        """The newest ``limit`` cycles of ``vm`` kept in full, newest first."""
        return [CycleRecord(**r) for r in
                self._all("SELECT * FROM cycles WHERE vm=? ORDER BY id DESC LIMIT ?",
                          (vm, limit))]

    def cycle_stats(self, rel: Relationship, now: float) -> dict:
        """``health.measure`` of ``rel``'s last 12 h of cycles, from the running
        aggregates (domain.history.CycleWindow): no rows read but the first time."""
        with self._lock:
            window = self._windows.get(rel.vm)
            if window is None:
                from ..domain.health import WINDOW
                rows = self._all("SELECT * FROM cycles WHERE vm=? AND started_at>=? "
                                 "ORDER BY id DESC", (rel.vm, now - WINDOW))
                window = CycleWindow.of(rel.vm, rel.frequency,
                                        [CycleRecord(**r) for r in rows])
                self._windows[rel.vm] = window
            return window.measure(rel, now)

    def roll_up(self, now: float | None = None) -> int:
        """Roll the cycles that started before the hour ``CYCLES_KEPT`` ago began into
        per-hour aggregates (whole hours only: a window counted in hours reads the same
        before and after), and drop the aggregates older than ``HOURS_KEPT``. Returns
        how many cycles were rolled up. One transaction: a crash leaves the rows."""
        now = time.time() if now is None else now
        before = hour_of(now - CYCLES_KEPT)
        with self.transaction():
            rows = [CycleRecord(**r) for r in
                    self._all("SELECT * FROM cycles WHERE started_at<? ORDER BY id",
                              (before,))]
            by_vm: dict[str, list[CycleRecord]] = {}
            for c in rows:
                by_vm.setdefault(c.vm, []).append(c)
            for vm, cycles in by_vm.items():
                for h in aggregate(vm, cycles):
                    self._exec(
                        "INSERT INTO cycle_hours(vm, hour, cycles, failures, raw_bytes, "
                        "wire_bytes, seconds_sum, seconds_max, bytes_max, late) "
                        "VALUES(?,?,?,?,?,?,?,?,?,?) ON CONFLICT(vm, hour) DO UPDATE SET "
                        "cycles=cycles+excluded.cycles, failures=failures+excluded.failures,"
                        " raw_bytes=raw_bytes+excluded.raw_bytes, "
                        "wire_bytes=wire_bytes+excluded.wire_bytes, "
                        "seconds_sum=seconds_sum+excluded.seconds_sum, "
                        "seconds_max=MAX(seconds_max, excluded.seconds_max), "
                        "bytes_max=MAX(bytes_max, excluded.bytes_max), "
                        "late=late+excluded.late",
                        (vm, h.hour, h.cycles, h.failures, h.raw_bytes, h.wire_bytes,
                         h.seconds_sum, h.seconds_max, h.bytes_max, h.late))
            self._exec("DELETE FROM cycles WHERE started_at<?", (before,))
            self._exec("DELETE FROM cycle_hours WHERE hour<?", (hour_of(now - HOURS_KEPT),))
        return len(rows)

    def cycle_hours(self, vm: str, since: float) -> list[HourAggregate]:
        """Per-hour aggregates of ``vm``'s cycles from the hour ``since`` falls in,
        oldest first: the rolled-up hours and the hours still kept in full."""
        since = hour_of(since)
        rolled = [HourAggregate(**r) for r in
                  self._all("SELECT * FROM cycle_hours WHERE vm=? AND hour>=? ORDER BY hour",
                            (vm, since))]
        live = aggregate(vm, [CycleRecord(**r) for r in
                              self._all("SELECT * FROM cycles WHERE vm=? AND started_at>=? "
                                        "ORDER BY id", (vm, since))])
        hours = {h.hour: h for h in rolled}
        for h in live:
            hours[h.hour] = hours[h.hour].plus(h) if h.hour in hours else h
        return [hours[k] for k in sorted(hours)]

    # -- tags --------------------------------------------------------------------------
    def tags(self, vm: str) -> list[str]:
        return [r["tag"] for r in self._all("SELECT tag FROM vm_tags WHERE vm=? ORDER BY tag",
                                            (vm,))]

    def all_tags(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self._all("SELECT vm, tag FROM vm_tags ORDER BY vm, tag"):
            out.setdefault(r["vm"], []).append(r["tag"])
        return out

    def set_tags(self, vm: str, add: list[str], remove: list[str]) -> None:
        with self.transaction():
            for t in add:
                self._exec("INSERT OR IGNORE INTO vm_tags(vm, tag) VALUES(?,?)", (vm, t))
            for t in remove:
                self._exec("DELETE FROM vm_tags WHERE vm=? AND tag=?", (vm, t))

    # -- events ----------------------------------------------------------------------
    def add_event(self, kind: str, message: str, vm: str | None = None) -> None:
        self._exec("INSERT INTO events(ts, vm, kind, message) VALUES(?,?,?,?)",
                   (time.time(), vm, kind, message))

    def purge_events(self, before: float) -> int:
        return self._exec("DELETE FROM events WHERE ts < ?", (before,)).rowcount

    def events_after(self, after_id: int, vm: str | None = None) -> list[dict]:
        if vm:
            return self._all("SELECT * FROM events WHERE id>? AND vm=? ORDER BY id", (after_id, vm))
        return self._all("SELECT * FROM events WHERE id>? ORDER BY id", (after_id,))

    def events(self, vm: str | None = None, since: float = 0, limit: int = 1000) -> list[dict]:
        if vm:
            return self._all("SELECT * FROM events WHERE vm=? AND ts>=? ORDER BY id DESC LIMIT ?",
                             (vm, since, limit))[::-1]
        return self._all("SELECT * FROM events WHERE ts>=? ORDER BY id DESC LIMIT ?",
                         (since, limit))[::-1]


class _Tx:
    def __init__(self, store: Store):
        self.store = store
        self.depth_owner = False

    def __enter__(self):
        self.store._lock.acquire()
        self.depth_owner = not self.store._db.in_transaction
        if self.depth_owner:
            self.store._db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.depth_owner:
                self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
        return False



# Fields a caller may not change: the key, and the times the store keeps.
_FIXED = frozenset({"vm", "created_at", "updated_at"})


def _check_fields(vm: str, changes: dict[str, Any]) -> None:
    """A change names fields of Relationship only: a misspelt name must not become a new
    key of the row (nothing would ever read it)."""
    bad = sorted(k for k in changes if k not in Relationship.field_names() or k in _FIXED)
    if bad:
        raise TypeError(f"cannot change {', '.join(bad)} of relationship {vm}: "
                        + ("not a field of domain.relationship.Relationship"
                           if any(k not in _FIXED for k in bad) else "kept by the store"))
