"""A cycle's connection to the replica is opened while the disks freeze
(PeerClient.connect_ahead): the request uses it, its error is the request's error, an
unused one is closed, and one kept too long is replaced by a fresh connection."""

from __future__ import annotations

import pytest

from vmreplica import errors
from vmreplica.transport.client import PeerClient


class _Conn:
    def __init__(self, n):
        self.n, self.closed = n, False

    def close(self):
        self.closed = True


def _client(monkeypatch, fail=False):
    c = PeerClient("127.0.0.1", 1, None, None, None, None, peer_name="site-b")
    made = []

    def connect():
        if fail:
            raise errors.Unreachable("cannot reach site-b (127.0.0.1:1): connection refused")
        made.append(_Conn(len(made)))
        return made[-1]

    monkeypatch.setattr(c, "_connect", connect)
    return c, made


def test_the_request_takes_the_connection_opened_ahead(monkeypatch):
    c, made = _client(monkeypatch)
    c.connect_ahead()
    conn = c._take_ahead()
    assert conn is made[0] and len(made) == 1
    assert c._take_ahead() is None          # taken once


def test_an_error_while_connecting_ahead_is_the_requests_error(monkeypatch):
    c, _ = _client(monkeypatch, fail=True)
    c.connect_ahead()
    with pytest.raises(errors.Unreachable):
        c.request("POST", "/v1/x", {"a": 1})


def test_an_unused_connection_is_closed(monkeypatch):
    c, made = _client(monkeypatch)
    c.connect_ahead()
    c.discard()
    assert made[0].closed
    c.discard()                              # nothing left: no error


def test_a_connection_opened_too_long_ago_is_not_used(monkeypatch):
    c, made = _client(monkeypatch)
    c.connect_ahead()
    c._ahead.join()
    kind, conn, at = c._ahead_result
    c._ahead_result = (kind, conn, at - PeerClient.AHEAD_MAX_AGE - 1)
    assert c._take_ahead() is None and made[0].closed
