"""Fuzzing the replica's peer API (issue 16): with the primary's own client certificate,
malformed, truncated and random requests to the routes a primary calls. Every answer is a
clear JSON refusal (4xx, never a 500 or a traceback), nothing hangs, the daemon keeps
serving, the replicated VM still equals its primary, and no file appears outside the
replica's own directories of that VM."""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_replica_equals, qemu_io
from vmreplica.transport import tls, wire

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("qemu_driver_only")]

MARK = "fuzzmark"      # in every hostile name: found anywhere afterwards, it escaped


class Peer:
    """Raw HTTP/1.1 over mutual TLS to a host's replication port, as site-a."""

    def __init__(self, a, b):
        self.ctx = tls.client_context(a.home / "tls" / "host.crt", a.home / "tls" / "host.key",
                                      [(b.home / "tls" / "host.crt").read_text()])
        self.port = b.port
        self.answers: list[tuple[str, int, dict | str]] = []

    def send(self, head: bytes, body: bytes = b"", *, what: str, timeout: float = 30,
             expect_answer: bool = True):
        """Send ``head`` (request line and headers, without the blank line) and ``body``;
        return (status, JSON) or None when the server closed without answering."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        t0 = time.monotonic()
        with self.ctx.wrap_socket(raw) as s:
            s.sendall(head + b"\r\n\r\n" + body)
            if not expect_answer:       # a cut link: reset, without a TLS close_notify
                time.sleep(0.2)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return None
            resp = http.client.HTTPResponse(s)
            try:
                resp.begin()
                data = resp.read()
            except (http.client.HTTPException, ConnectionResetError, TimeoutError) as e:
                PROBLEMS.append(f"{what}: no answer ({e!r:.100})")
                return None
        assert time.monotonic() - t0 < timeout, f"{what}: took {time.monotonic() - t0:.1f}s"
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data[:200].decode(errors="replace")
        self.answers.append((what, resp.status, parsed))
        return resp.status, parsed

    def request(self, method: str, path: str, body: bytes | None = None, *, what: str,
                content_type: str = "application/json", **kw):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close".encode()
        if body is not None:
            head += f"\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}".encode()
        return self.send(head, body or b"", what=what, **kw)

    def chunked(self, path: str, pieces: list[bytes], *, what: str, end: bool = True, **kw):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked").encode()
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
        return self.send(head, body + (b"0\r\n\r\n" if end else b""), what=what, **kw)


PROBLEMS: list[str] = []     # every answer that was not a clear refusal, reported at the end


def refusal(answer, what: str, allow_ok: bool = False):
    try:
        _refusal(answer, what, allow_ok)
    except AssertionError as e:
        PROBLEMS.append(str(e).splitlines()[0][:300])


def _refusal(answer, what: str, allow_ok: bool = False):
    """A clear refusal: 4xx with a JSON error that has a code and a message."""
    assert answer is not None, f"{what}: no answer"
    status, body = answer
    if allow_ok and status == 200:
        return
    assert 400 <= status < 500, f"{what}: HTTP {status} {body}"
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"{what}: {body}"
    assert body["error"].get("code") and body["error"].get("message"), f"{what}: {body}"
    assert "Traceback" not in json.dumps(body) and "internal error" not in body["error"]["message"]


def tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.join(dirpath, n))
    return out


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)


def _bodies(keys: list[str]):
    return st.dictionaries(st.sampled_from(keys), _json, max_size=len(keys)) | _json


def _relationship_id(host, vm: str) -> str:
    import sqlite3
    db = sqlite3.connect(f"file:{host.home / 'state.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT id FROM relationships WHERE vm=?", (vm,)).fetchone()[0]
    finally:
        db.close()


def test_the_peer_api_refuses_malformed_requests(own_sites, vm_name, lab_root):
    a, b = own_sites
    vm = vm_name
    PROBLEMS.clear()
    a.run("vm", "create", vm, "--disk", "32M")
    disk = a.vm(vm)["disks"][0]["path"]
    qemu_io(disk, "write -P 0x5a 1M 2M")
    a.run("enable", vm, "--replica", b.address)
    a.run("initial", vm)
    qemu_io(disk, "write -P 0x6b 5M 64k")
    a.run("sync", vm)
    assert_replica_equals(a, b, vm)
    state = next(r for r in b.json("status") if r["vm"] == vm)
    rel_id = _relationship_id(b, vm)
    before_lab = tree(lab_root)
    before_b = tree(b.home)
    peer = Peer(a, b)
    base = f"/v1/replica/relationships/{vm}"
    t0 = time.monotonic()

    # -- relationship creation: wrong types, missing fields, hostile names ---------------
    good_desc = {"disks": [{"name": "disk0", "format": "qcow2", "virtual_size": 1 << 20}]}
    # (absolute names point into the lab root: a regression must not write to /etc)
    hostile = [f"../{MARK}-1", str(lab_root / f"{MARK}-2"), f"a\0{MARK}", "..", ".", f"x/../../{MARK}-3",
               f"{MARK}/sub", "", f"-{MARK}", "\n", "x" * 300, 5, None, ["x"], {"a": 1}]
    bodies = [{"vm": n, "id": "r1", "description": good_desc} for n in hostile]
    bodies += [{"vm": f"{MARK}-d{i}", "id": "r2",
                "description": {"disks": [{"name": d, "virtual_size": 1 << 20}]}}
               for i, d in enumerate([f"../../{MARK}-4", str(lab_root / f"{MARK}-abs"), "..", "a\0b", 7, None, ""])]
    bodies += [{"vm": f"{MARK}-t", "id": "r3", "description": good_desc, k: v}
               for k, v in [("epoch", "x"), ("epoch", [1]), ("epoch", 1 << 70),
                            ("history", "lots"), ("frequency", {}), ("point_interval", 1e400),
                            ("max_stall", "NaN"), ("holders", "site-a"), ("mode", 3)]]
    bodies += [{"vm": f"{MARK}-u"}, {"vm": f"{MARK}-v", "id": "r4"},
               {"vm": f"{MARK}-w", "id": "r5", "description": []},
               {"vm": f"{MARK}-x", "id": "r6", "description": {"disks": "disk0"}},
               {"vm": f"{MARK}-y", "id": "r7", "description": {"disks": [1, 2]}},
               {"vm": f"{MARK}-z", "id": "r8",
                "description": {"disks": [{"name": "d", "virtual_size": -5}]}},
               {"vm": f"{MARK}-z2", "id": 12, "description": good_desc}]
    for body in bodies:
        refusal(peer.request("POST", "/v1/replica/relationships",
                             json.dumps(body).encode(), what=f"create {body}"),
                f"create {str(body)[:80]}")
    for raw in [b"{", b"[]", b"null", b"\xff\xfe", b"[" * 50000 + b"]" * 50000, b'{"vm": 1',
                b"\x00" * 100]:
        refusal(peer.request("POST", "/v1/replica/relationships", raw, what=f"create {raw[:20]}"),
                f"create raw {raw[:20]!r}")

    # -- the routes of an existing relationship, with bad bodies ------------------------------
    for route, body in [("settings", {"history": "x"}), ("settings", {"history": [1]}),
                        ("settings", {"point_interval": "soon"}), ("settings", {"history": 1e300}),
                        ("settings", {"history": -3}), ("settings", []),
                        ("point", {"epoch": "x"}), ("point", {"epoch": 99, "time": "now"}),
                        ("point", {"epoch": 99, "kind": f"../{MARK}"}),
                        ("point", {"epoch": 99, "time": float("inf")}),
                        ("final", {"epoch": [1]}), ("final", {"epoch": "1; drop"}),
                        ("final", {"epoch": 1 << 80}),
                        ("disks", {"disks": "disk0"}), ("disks", {"disks": [{"x": 1}]}),
                        ("disks", {"disks": [{"name": f"../{MARK}-5", "virtual_size": 1024}]}),
                        ("disks", {"disks": [{"name": "disk0"}, {"name": "disk0"}]}),
                        ("disks", {"disks": []})]:
        refusal(peer.request("POST", f"{base}/{route}", json.dumps(body).encode(),
                             what=f"{route} {body}"), f"{route} {body}")
    for q in ["x", "-1", "1e3", "99999999999999999999999", "%00", "1%2F2"]:
        refusal(peer.request("GET", f"{base}/state?epoch={q}", what=f"state {q}"), f"state {q}")
    for name in ["..", "%2e%2e", f"..%2F{MARK}", f"{MARK}%00x", "nosuch"]:
        refusal(peer.request("GET", f"/v1/replica/relationships/{name}/state", what=name), name)
        refusal(peer.request("POST", f"/v1/replica/relationships/{name}/cycles", b"VMRC",
                             what=f"cycle to {name}"), f"cycle to {name}")

    # -- HTTP framing -----------------------------------------------------------------------
    for head, body in [
            (f"POST {base}/settings HTTP/1.1\r\nContent-Length: -1", b"{}"),
            (f"POST {base}/settings HTTP/1.1\r\nContent-Length: abc", b"{}"),
            (f"POST {base}/cycles HTTP/1.1\r\nTransfer-Encoding: chunked", b"-1\r\nxx\r\n"),
            (f"POST {base}/cycles HTTP/1.1\r\nTransfer-Encoding: chunked", b"zz\r\n"),
            (f"POST {base}/cycles HTTP/1.1\r\nTransfer-Encoding: chunked",
             b"ffffffffffffffffffffffff\r\nVMRC"),
            (f"POST {base}\x00/cycles HTTP/1.1", b""),
            ("GARBAGE", b""), (f"PATCH {base}/settings HTTP/1.1", b""),
            (f"POST {base}/settings HTTP/1.1\r\n" + "X: y\r\n" * 150, b"")]:
        refusal(peer.send(head.encode() + b"\r\nConnection: close", body, what=head[:60]),
                head[:60])

    # -- cycles: truncated, corrupted, random; none may change the replica -------------------
    w = wire.CycleWriter({"vm": vm, "relationship": rel_id, "epoch": state["epoch"],
                          "cycle": 1000, "initial": False, "resync": False,
                          "disks": ["disk0"], "primary": a.name, "verify": False, "id": "f",
                          "freeze_time": time.time()}, "zstd")
    cycle = (w.begin() + w.data(0, 0, b"\x77" * 65536) + w.data(0, 1 << 20, os.urandom(4096))
             + w.zero(0, 2 << 20, 4096) + w.end({"cycle": 1000, "epoch": 1, "freeze_time": 1.0}))
    cuts = sorted({int(len(cycle) * f / 40) for f in range(40)})
    for cut in cuts:
        refusal(peer.chunked(f"{base}/cycles", [cycle[:cut]], what=f"cycle cut at {cut}"),
                f"cycle cut at {cut}")
    for i in range(0, len(cycle), max(1, len(cycle) // 30)):
        bad = bytearray(cycle)
        bad[i] ^= 0x10
        refusal(peer.chunked(f"{base}/cycles", [bytes(bad)], what=f"cycle flip at {i}"),
                f"cycle flip at {i}")
    refusal(peer.chunked(f"{base}/cycles", [cycle, b"trailing"], what="cycle + junk"),
            "cycle + junk")
    # A connection cut in the middle of a cycle: no answer, nothing staged or applied.
    peer.chunked(f"{base}/cycles", [cycle[:len(cycle) // 2]], end=False, expect_answer=False,
                 what="cut connection")

    # -- hypothesis: random bodies on every route -----------------------------------------
    count = {"n": 0}

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["create", "settings", "point", "final", "cycles", "state"]),
           st.data())
    def fuzz(route, data):
        count["n"] += 1
        if route == "create":
            body = json.dumps(data.draw(_bodies(["vm", "id", "description", "epoch", "history",
                                                 "security_tag", "holders"]))).encode()
            refusal(peer.request("POST", "/v1/replica/relationships", body, what=f"fz {body}"),
                    f"fuzz create {body[:80]}")
        elif route in ("settings", "point", "final"):
            keys = {"settings": ["history", "point_interval"], "point": ["epoch", "kind", "time"],
                    "final": ["epoch"]}[route]
            body = data.draw(_bodies(keys))
            if route in ("final", "point") and isinstance(body, dict) \
                    and isinstance(body.get("epoch"), int):
                # (a valid final would prepare a failover, a valid point freeze the heads)
                body["epoch"] = -1 - abs(body["epoch"])
            raw = json.dumps(body).encode()
            refusal(peer.request("POST", f"{base}/{route}", raw, what=f"fz {route} {raw}"),
                    f"fuzz {route} {raw[:80]}", allow_ok=route == "settings")
        elif route == "cycles":
            blob = data.draw(st.binary(max_size=300) | st.builds(
                lambda n, tail: cycle[:n] + tail, st.integers(0, len(cycle)),
                st.binary(max_size=40)))
            refusal(peer.chunked(f"{base}/cycles", [blob], what="fz cycle"), "fuzz cycle")
        else:
            q = data.draw(st.text(max_size=12))
            from urllib.parse import quote
            refusal(peer.request("GET", f"{base}/state?epoch={quote(q)}", what=f"fz state {q!r}"),
                    f"fuzz state {q!r}", allow_ok=q.isdigit() and q.isascii())

    fuzz()
    elapsed = time.monotonic() - t0

    # -- afterwards -----------------------------------------------------------------------
    time.sleep(0.5)                     # (the cut connection's handler ends)
    log = (b.home / "daemon.log").read_text()
    five = [x for x in peer.answers if x[1] >= 500]
    assert not PROBLEMS and not five, "\n".join(PROBLEMS + [f"HTTP {x[1]}: {x}" for x in five])
    errors = [ln for ln in log.splitlines() if "internal error" in ln or "Traceback" in ln]
    assert not errors, errors
    assert b.run("status").returncode == 0
    assert_replica_equals(a, b, vm)
    after = next(r for r in b.json("status") if r["vm"] == vm)
    assert after["state"] == state["state"]
    new = tree(lab_root) - before_lab
    allowed = (str(b.home / "storage" / vm), str(b.home / "staging" / vm), str(b.home / "run"),
               str(b.home / "state.db"), str(b.home / "daemon.log"),
               str(a.home / "run"), str(a.home / "state.db"), str(a.home / "daemon.log"))
    outside = sorted(p for p in new if not p.startswith(allowed))
    assert not outside, f"files created outside the VM's directories: {outside}"
    assert not [p for p in tree(lab_root) if MARK in p]
    assert not [p for p in os.listdir("/tmp") if MARK in p]
    assert not list((b.home / "staging" / vm).glob("*.part"))
    assert tree(b.home / "storage" / vm) <= before_b, "new layers in the replica's storage"
    print(f"\n{len(peer.answers)} requests ({count['n']} from hypothesis) in {elapsed:.1f}s; "
          f"statuses: { {s: sum(1 for x in peer.answers if x[1] == s) for s in sorted({x[1] for x in peer.answers})} }")
