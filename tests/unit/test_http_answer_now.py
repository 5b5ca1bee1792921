"""A route that answers before it ends (transport.http.Request.answer_now): the replica
acknowledges a staged cycle, then applies it. Real TLS on loopback, the real client
streaming a chunked body as a cycle does: the client has its answer while the route still
works, an error after the answer is logged and not sent, and the server goes on serving."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from vmreplica import errors
from vmreplica.transport import http as vhttp
from vmreplica.transport import tls
from vmreplica.transport.client import PeerClient


@pytest.fixture
def server(tmp_path):
    names = {}
    for name in ("site-a", "site-b"):
        key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        fp = tls.generate_identity(name, key, crt)
        names[name] = (key, crt, crt.read_text(), fp)
    b_key, b_crt, b_pem, b_fp = names["site-b"]
    a_key, a_crt, a_pem, _ = names["site-a"]
    state = {"release": threading.Event(), "ended": threading.Event(), "fail": False}
    router = vhttp.Router()

    @router.route("POST", "/v1/work")
    def work(req):
        body = req.body()
        got = 0
        while got < 3 << 20:                       # the stream, up to its own end frame
            piece = body.read(min(1 << 20, (3 << 20) - got))
            assert piece
            got += len(piece)
        req.answer_now({"staged": got})
        state["release"].wait(10)                  # the client has its answer meanwhile
        state["ended"].set()
        if state["fail"]:
            raise errors.StorageFull("no space left while applying")
        return {"never": "sent"}

    @router.route("GET", "/v1/ping")
    def ping(req):
        return {"ok": True}

    srv = vhttp.TLSHTTPServer(("127.0.0.1", 0), router,
                              lambda: tls.server_context(b_crt, b_key, [a_pem]))
    vhttp.serve_in_thread(srv, "answer-now-test")

    def client():
        return PeerClient("127.0.0.1", srv.server_address[1], a_crt, a_key, b_pem, b_fp,
                          peer_name="site-b", timeout=10)
    try:
        yield client, state
    finally:
        state["release"].set()
        srv.shutdown()
        srv.server_close()


def _stream():
    for i in range(3):
        yield bytes([i]) * (1 << 20)


def test_the_client_has_the_answer_while_the_route_still_works(server):
    client, state = server
    answer = client().request("POST", "/v1/work", _stream())
    assert answer == {"staged": 3 << 20}
    assert not state["ended"].is_set()             # answered before the route ended
    state["release"].set()
    assert state["ended"].wait(10)
    assert client().request("GET", "/v1/ping") == {"ok": True}


def test_an_error_after_the_answer_is_logged_not_sent(server, caplog):
    client, state = server
    state["fail"] = True
    with caplog.at_level(logging.ERROR, logger="vmreplica.http"):
        assert client().request("POST", "/v1/work", _stream()) == {"staged": 3 << 20}
        state["release"].set()
        assert state["ended"].wait(10)
        assert client().request("GET", "/v1/ping") == {"ok": True}
        deadline = time.monotonic() + 10
        while not any("failed after its answer: no space left while applying"
                      in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.01)
