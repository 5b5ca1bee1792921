"""A daemon talks to the same peer every cycle: its client context is built once and the
TLS session the last connection left is offered again (issue 20). Real TLS on loopback:
the second request resumes, the server still knows which pinned peer it is, a server
whose pinned peers changed makes a full handshake again, and a certificate that is not
the pinned one is refused whatever session was kept."""

from __future__ import annotations

import ssl

import pytest

from vmreplica import errors
from vmreplica.transport import http as vhttp
from vmreplica.transport import tls
from vmreplica.transport.client import PeerClient


def _identity(tmp_path, name):
    key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    fp = tls.generate_identity(name, key, crt)
    return key, crt, crt.read_text(), fp


@pytest.fixture
def peers(tmp_path):
    """A server (site-b) pinning a client (site-a); the server's context can be swapped."""
    b_key, b_crt, b_pem, b_fp = _identity(tmp_path, "site-b")
    a_key, a_crt, a_pem, a_fp = _identity(tmp_path, "site-a")
    seen: list[tuple[str | None, bool]] = []
    router = vhttp.Router()

    @router.route("GET", "/v1/who")
    def who(req):
        sock = req.handler.request
        seen.append((req.peer_fingerprint, sock.session_reused))
        return {"peer": req.peer_fingerprint}

    contexts = {"now": tls.server_context(b_crt, b_key, [a_pem])}
    server = vhttp.TLSHTTPServer(("127.0.0.1", 0), router, lambda: contexts["now"])
    vhttp.serve_in_thread(server, "tls-resume-test")

    def client(pin=b_pem, fp=b_fp):
        return PeerClient("127.0.0.1", server.server_address[1], a_crt, a_key, pin, fp,
                          peer_name="site-b", timeout=10)
    try:
        yield {"client": client, "seen": seen, "a_fp": a_fp, "server": server,
               "renew": lambda pems: contexts.update(now=tls.server_context(b_crt, b_key,
                                                                             pems)),
               "a_pem": a_pem, "tmp": tmp_path}
    finally:
        server.shutdown()
        server.server_close()


def test_the_second_connection_resumes_and_the_server_still_knows_the_peer(peers):
    c = peers["client"]()
    for _ in range(3):
        assert c.request("GET", "/v1/who")["peer"] == peers["a_fp"]
    # a new PeerClient (as every cycle makes) resumes too: sessions are kept per peer
    assert peers["client"]().request("GET", "/v1/who")["peer"] == peers["a_fp"]
    assert [fp for fp, _ in peers["seen"]] == [peers["a_fp"]] * 4
    assert [r for _, r in peers["seen"]] == [False, True, True, True]


def test_a_server_whose_pins_changed_makes_a_full_handshake(peers):
    c = peers["client"]()
    c.request("GET", "/v1/who")
    c.request("GET", "/v1/who")
    peers["renew"]([peers["a_pem"]])          # (as host.server_context does on a change)
    assert c.request("GET", "/v1/who")["peer"] == peers["a_fp"]
    c.request("GET", "/v1/who")
    assert [r for _, r in peers["seen"]] == [False, True, False, True]


def test_an_unpinned_client_is_not_let_in_by_a_kept_session(peers):
    c = peers["client"]()
    c.request("GET", "/v1/who")
    peers["renew"]([])                          # the server unpaired everyone
    c.request("GET", "/v1/who")
    # (no pinned peers: the server asks for no certificate, and the route sees none)
    assert peers["seen"][-1] == (None, False)


def test_a_server_with_another_certificate_is_refused_despite_a_kept_session(peers):
    c = peers["client"]()
    c.request("GET", "/v1/who")
    o_key, o_crt, _, _ = _identity(peers["tmp"], "other")
    peers["renew"]([peers["a_pem"]])
    # The server now presents another certificate: the client's context (pinned to
    # site-b's) refuses it, session or not.
    peers["server"].context_provider = lambda: tls.server_context(o_crt, o_key,
                                                                  [peers["a_pem"]])
    with pytest.raises(errors.NotTrusted):
        c.request("GET", "/v1/who")


def test_the_client_context_is_built_once_per_identity_and_pins(tmp_path):
    key, crt, pem, _ = _identity(tmp_path, "x")
    _, _, other, _ = _identity(tmp_path, "y")
    one = tls.cached_client_context(crt, key, [pem])
    assert tls.cached_client_context(crt, key, [pem]) is one
    assert tls.cached_client_context(crt, key, [other]) is not one
    tls.generate_identity("x", key, crt)          # re-initialised: read again
    assert tls.cached_client_context(crt, key, [pem]) is not one
    assert isinstance(one, ssl.SSLContext) and one.verify_mode == ssl.CERT_REQUIRED
