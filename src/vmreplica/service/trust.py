"""Trust without a CA: one-time pairing tokens and pinned certificates, both directions.

On the replica, `trust token` makes a token = id + secret + the replica's certificate
fingerprint (valid 15 minutes, single use). On the primary, `trust pair HOST:PORT TOKEN`
connects with TLS, checks the server's certificate against the fingerprint in the token,
and sends its own certificate with the secret; the replica checks the secret and pins the
primary; the primary pins the replica. From then on every request is mutual TLS against
the pinned certificates, and the peer's name is the one it was paired under.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from ..errors import NotTrusted, Refused, UsageError
from ..transport import tls
from ..transport.client import PeerClient
from .home import parse_address, validate_host_name

TOKEN_PREFIX = "vmr1-"
TOKEN_TTL = 15 * 60


def _hash(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def make_token(host) -> dict:
    token_id = secrets.token_bytes(6)
    secret = secrets.token_bytes(16)
    fp = bytes.fromhex(host.fingerprint.split(":", 1)[1])
    expires = time.time() + TOKEN_TTL
    host.store.add_token(token_id.hex(), _hash(secret), expires)
    text = TOKEN_PREFIX + base64.urlsafe_b64encode(token_id + secret + fp).decode().rstrip("=")
    host.event("trust", "pairing token issued (valid 15 minutes, single use)")
    return {"token": text, "expires_at": expires, "address": host.listen, "name": host.name}


def parse_token(text: str) -> tuple[str, bytes, str]:
    text = (text or "").strip()
    if not text.startswith(TOKEN_PREFIX):
        raise UsageError("this is not a vmreplica pairing token",
                         hint="copy the last line printed by `vmreplica trust token` on the replica")
    body = text[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raw = b""
    if len(raw) != 6 + 16 + 32:
        raise UsageError("the pairing token is damaged (wrong length)",
                         hint="copy the whole last line printed by `vmreplica trust token`")
    return raw[:6].hex(), raw[6:22], "sha256:" + raw[22:].hex()


def pair(host, address: str, token: str) -> dict:
    """Primary side: pair with the host at ``address`` using its token."""
    token_id, secret, fingerprint = parse_token(token)
    h, port = parse_address(address)
    # No client certificate yet: the replica does not know ours until it has checked the
    # token's secret (its TLS server verifies every certificate it is shown).
    client = PeerClient(h, port, None, None, pinned_pem=None,
                        expect_fingerprint=fingerprint, timeout=30)
    try:
        answer = client.request("POST", "/v1/pair", {
            "token_id": token_id, "secret": secret.hex(), "name": host.name,
            "cert_pem": host.cert_pem, "address": host.listen,
        })
    except NotTrusted as e:
        if e.presented:
            raise token_mismatch(f"{h}:{port}", client.server_name, e.presented,
                                 fingerprint) from None
        raise
    peer_pem = answer.get("cert_pem", "")
    if tls.fingerprint_pem(peer_pem) != fingerprint:
        raise NotTrusted(f"{address} answered with a certificate that does not match the token")
    name = validate_host_name(answer.get("name", ""))
    if name == host.name:
        raise UsageError(f"{address} is this host's own name ({name})",
                         hint="each host needs its own name: `init --name`")
    host.store.add_peer(name, f"{h}:{port}", fingerprint, peer_pem)
    host.event("trust", f"paired with {name} at {h}:{port} ({fingerprint[:23]}…)")
    return {"peer": name, "address": f"{h}:{port}", "fingerprint": fingerprint}


# A typo in the token's last part changes one or two characters of the fingerprint it
# carries; a token made on another host differs in nearly all 64.
TYPO_MAX_CHARS = 4


def token_mismatch(address: str, peer_name: str | None, presented: str,
                   expected: str) -> NotTrusted:
    """The host at ``address`` is not the one the token was made on: show both
    fingerprints in full with the differing characters marked, and say what is likelier,
    a mistyped token or a token from another host."""
    who = f"{address} ({peer_name})" if peer_name else address
    there = peer_name or address
    shown, ndiff = tls.compare_fingerprints(
        presented, expected, (f"{there} presents", "the token expects"))
    retype = (f"copy the whole last line printed by `vmreplica trust token` on {there} "
              "again")
    if ndiff <= TYPO_MAX_CHARS:
        return NotTrusted(
            f"the pairing token does not match {who}: the certificate fingerprint it carries "
            f"differs from {there}'s in {ndiff} character(s) (marked), so the token is "
            f"probably mistyped:\n{shown}",
            hint=f"the address is right; the token may be wrong: {retype}, or make a new "
                 f"one there")
    return NotTrusted(
        f"the pairing token does not match {who}: the certificate fingerprint it carries "
        f"differs from {there}'s in {ndiff} of its {len(expected.split(':')[-1])} characters "
        f"(marked), so the token was made on another host, or is mistyped:\n{shown}",
        hint=f"pair with the address of the host that printed this token, or run "
             f"`vmreplica trust token` on {there} and pair with the token it prints "
             "(check that it was copied whole)")


def accept_pairing(host, body: dict) -> dict:
    """Replica side of /v1/pair: check the token, pin the caller, answer with our cert."""
    token_id = str(body.get("token_id", ""))
    try:
        secret = bytes.fromhex(str(body.get("secret", "")))
    except ValueError:
        secret = b""
    # The messages travel to the primary's terminal: they name this host (where a new
    # token is made), never "this host".
    where = f"{host.name} ({host.listen})"
    new_one = (f"run `vmreplica trust token` on {where} and pair with the token it prints")
    row = host.store.token(token_id)
    if row is None or not hmac.compare_digest(row["secret_hash"], _hash(secret)):
        # A wrong secret does not use the token up: a mistyped copy can be corrected.
        why = ("it issued no such token: the token may be mistyped, or it was made on "
               "another host") if row is None else (
               "the token's secret does not match the token of that id it issued: the "
               "token is probably mistyped")
        raise Refused(f"pairing refused by {host.name}: {why}",
                      hint=f"copy the whole last line printed by `vmreplica trust token` on "
                           f"{host.name} again, or {new_one}")
    row = host.store.use_token(token_id)
    if row is None or row["used_at"] is not None:
        raise Refused(f"pairing refused by {host.name}: this token was already used",
                      hint=f"tokens are single use: {new_one}")
    if row["expires_at"] < time.time():
        raise Refused(f"pairing refused by {host.name}: the token has expired (tokens last "
                      "15 minutes)", hint=new_one)
    name = validate_host_name(str(body.get("name", "")))
    if name == host.name:
        raise UsageError(f"the pairing host uses this host's own name ({name})")
    pem = str(body.get("cert_pem", ""))
    try:
        fp = tls.fingerprint_pem(pem)
    except Exception:  # noqa: BLE001
        raise UsageError("pairing refused: the certificate sent is not valid PEM") from None
    address = body.get("address")
    if address:
        hh, pp = parse_address(address)
        address = f"{hh}:{pp}"
    host.store.add_peer(name, address, fp, pem)
    host.event("trust", f"paired with {name} ({fp[:23]}…)")
    return {"name": host.name, "cert_pem": host.cert_pem}


def require_peer(host, fingerprint: str | None) -> dict:
    """The pinned peer behind a replication request, or a clear refusal."""
    if fingerprint is None:
        raise NotTrusted(f"{host.name} requires a client certificate on this endpoint",
                         hint="pair the hosts first: `vmreplica trust token` / `trust pair`")
    peer = host.store.peer_by_fingerprint(fingerprint)
    if peer is None:
        raise NotTrusted(f"{host.name} has not paired with this host",
                         hint=f"on {host.name} run `vmreplica trust token`, then "
                              "`vmreplica trust pair` on this host")
    return peer
