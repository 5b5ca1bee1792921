"""TLS identities and pinning: each host has a self-signed certificate; peers pin it.

No CA: a host trusts exactly the certificates it pinned at pairing time. Server and
client contexts load the pinned certificates as their only trust anchors, and the peer's
SHA-256 fingerprint is compared as well, so a certificate is accepted only if it is
byte-for-byte the pinned one.

NBD over TLS (continuous mode's mirror, the libvirt relay) uses a leaf certificate the
host's identity issues, in the x509 folders QEMU and libnbd read (``creds_dir``).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import threading
from pathlib import Path

FINGERPRINT_PREFIX = "sha256:"


def generate_identity(name: str, key_path: Path, cert_path: Path) -> str:
    """Write a new EC P-256 key and a self-signed certificate for ``name``; return its fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmreplica host")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # A self-signed certificate that is its own trust anchor: CA:TRUE lets OpenSSL
        # accept it as the anchor; path length 0 stops it from signing anything else.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    Path(cert_path).write_bytes(cert_pem)
    return fingerprint_pem(cert_pem.decode())


def fingerprint_der(der: bytes) -> str:
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: str) -> str:
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(pem.strip() + "\n"))


def compare_fingerprints(presented: str, expected: str,
                         labels: tuple[str, str] = ("presented", "expected")) -> tuple[str, int]:
    """Both fingerprints in full, one under the other, with a line of carets under the
    characters that differ (two fingerprints cut short look identical when they differ
    further on); and how many characters differ."""
    width = max(len(label) for label in labels)
    diff = [i for i in range(max(len(presented), len(expected)))
            if presented[i:i + 1] != expected[i:i + 1]]
    marks = "".join("^" if i in diff else " " for i in range(max(diff, default=-1) + 1))
    lines = [f"  {labels[0]:<{width}}  {presented}",
             f"  {labels[1]:<{width}}  {expected}",
             f"  {'':<{width}}  {marks}".rstrip()]
    return "\n".join(lines), len(diff)


def name_of_der(der: bytes | None) -> str | None:
    """The common name a host's certificate was made for (its host name), if readable."""
    if not der:
        return None
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
        cn = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else None
    except Exception:  # noqa: BLE001 — a name for a message, nothing depends on it
        return None


def peer_fingerprint(sock: ssl.SSLSocket) -> str | None:
    der = sock.getpeercert(binary_form=True)
    return fingerprint_der(der) if der else None


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(cert: Path, key: Path, pinned_pems: list[str]) -> ssl.SSLContext:
    """Server side: present our certificate; accept client certificates that are pinned.

    A client certificate is optional at the TLS level (pairing happens before the peer
    is pinned); every route but pairing requires one (see ``service.trust.require_peer``).
    """
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    if pinned_pems:
        ctx.load_verify_locations(cadata="\n".join(p.strip() for p in pinned_pems) + "\n")
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(cert: Path | None, key: Path | None,
                   pinned_pems: list[str] | None) -> ssl.SSLContext:
    """Client side: present our certificate (if any); accept only the pinned server certificate.

    With ``pinned_pems=None`` (pairing) the server's certificate is not verified by
    OpenSSL; the caller compares its fingerprint with the one in the pairing token.
    """
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if pinned_pems:
        ctx.load_verify_locations(cadata="\n".join(p.strip() for p in pinned_pems) + "\n")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


# A host's daemon connects to the same peers every cycle: building the context (parsing
# its key, certificate and the pinned certificates) once, and resuming the TLS session
# the last connection to that peer left (TLS 1.3 tickets: no certificate chain to send
# or verify, no signature), costs a cycle a fraction of a full handshake (issue 20).
_CLIENT_CONTEXTS: dict[tuple, ssl.SSLContext] = {}
_CONTEXTS_KEPT = 32
_contexts_lock = threading.Lock()


def cached_client_context(cert: Path | None, key: Path | None,
                          pinned_pems: list[str]) -> ssl.SSLContext:
    """``client_context`` for a pinned peer, built once per certificate and key (by
    their contents: a re-initialised identity is read again) and set of pinned
    certificates."""
    def content(path: Path | None) -> bytes | None:
        try:
            return Path(path).read_bytes() if path is not None else None
        except OSError:
            return None
    k = (content(cert), content(key), tuple(p.strip() for p in pinned_pems))
    with _contexts_lock:
        ctx = _CLIENT_CONTEXTS.get(k)
        if ctx is None:
            ctx = client_context(cert, key, pinned_pems)
            if len(_CLIENT_CONTEXTS) >= _CONTEXTS_KEPT:
                _CLIENT_CONTEXTS.pop(next(iter(_CLIENT_CONTEXTS)))
            _CLIENT_CONTEXTS[k] = ctx
        return ctx


class Sessions:
    """The last TLS session of each (context, peer address, expected fingerprint): the
    next connection there offers it. The peer decides whether to resume (a server whose
    pinned peers changed has a new context: it cannot read the ticket, and a full
    handshake follows); either way the certificate the session carries is checked
    against the pin as on a full handshake."""

    def __init__(self, kept: int = 256):
        self._kept = kept
        self._by: dict[tuple, ssl.SSLSession] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> ssl.SSLSession | None:
        with self._lock:
            return self._by.get(key)

    def put(self, key: tuple, session: ssl.SSLSession | None) -> None:
        if session is None:
            return
        with self._lock:
            self._by.pop(key, None)
            if len(self._by) >= self._kept:
                self._by.pop(next(iter(self._by)))
            self._by[key] = session

    def forget(self, key: tuple) -> None:
        with self._lock:
            self._by.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._by.clear()


def forget_kept() -> None:
    """Drop every kept client context and session (the next connection makes a full
    handshake with a new context): for benchmarks that measure what they save."""
    with _contexts_lock:
        _CLIENT_CONTEXTS.clear()
    SESSIONS.clear()


SESSIONS = Sessions()


def issue_leaf(ca_key: Path, ca_cert: Path, name: str, key_out: Path, cert_out: Path,
               days: int = 3650, ips: list[str] | None = None) -> None:
    """A leaf certificate for this host signed by its own identity (for QEMU's NBD TLS,
    which refuses a CA certificate as a server or client certificate). Peers verify it
    against the identity certificate they pinned, used as the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    issuer_key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), None)
    issuer = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                    "vmreplica NBD")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(name)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]  # EC: generate_identity
    )
    fd = os.open(key_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    Path(cert_out).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- NBD over TLS (QEMU, qemu-storage-daemon, libnbd) -------------------------------------
# ``host`` is the host context (its home, name, listen address and identity).

def leaf_paths(home) -> tuple[Path, Path]:
    """This host's NBD leaf certificate (issued once by its own identity)."""
    key, crt = home.root / "tls" / "nbd-leaf.key", home.root / "tls" / "nbd-leaf.crt"
    return key, crt


def ensure_leaf(host) -> tuple[Path, Path]:
    """The leaf names the host and, when it listens on an IP address, that address too
    (libnbd checks the address it connected to)."""
    key, crt = leaf_paths(host.home)
    if not (key.exists() and crt.exists()):
        bind = host.listen.rsplit(":", 1)[0].strip("[]")
        try:
            ips = [str(ipaddress.ip_address(bind))]
        except ValueError:
            ips = []
        issue_leaf(host.home.key, host.home.cert, host.name, key, crt, ips=ips)
    return key, crt


def creds_dir(host, peer: dict, endpoint: str, name: str) -> Path:
    """A QEMU/libnbd x509 credentials folder: ca-cert.pem (this host's identity and the
    pinned peer's: each side verifies the other, and QEMU checks its own certificate),
    and this host's leaf as `<endpoint>-cert.pem` / `<endpoint>-key.pem`."""
    key, crt = ensure_leaf(host)
    d = host.home.run / f"tls-{name}"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    (d / "ca-cert.pem").write_text(host.cert_pem.strip() + "\n" + peer["cert_pem"].strip() + "\n")
    (d / f"{endpoint}-cert.pem").write_bytes(crt.read_bytes())
    k = d / f"{endpoint}-key.pem"
    k.write_bytes(key.read_bytes())
    k.chmod(0o600)
    return d
