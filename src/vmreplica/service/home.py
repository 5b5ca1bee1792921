"""A host's home directory: where its state, identity, VMs, replica storage and sockets live.

    HOME/state.db            SQLite state (settings, peers, relationships, history)
    HOME/tls/host.key,.crt   this host's identity (self-signed, pinned by its peers)
    HOME/vms/                the hypervisor driver's VM folders
    HOME/storage/            default replica storage (qcow2 chains of replicated disks)
    HOME/staging/            received cycles, staged durably before they are applied
    HOME/run/                mgmt.sock (management API), daemon.pid; HOME/daemon.log
"""

from __future__ import annotations

import os
import re

from ..errors import Conflict, UsageError

TYPE_CHECKING = False      # (typing itself is 3 ms of import: see Home)
if TYPE_CHECKING:
    from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$")
MAX_SOCKET_PATH = 107
# Paths inside a home that Home gives both as Paths and, for a client command's start
# (no pathlib), as strings.
_DB = "state.db"
_CERT = ("tls", "host.crt")
_SOCKET = ("run", "mgmt.sock")


class Home:
    """A home, by its absolute root. (A plain class, not a dataclass: every CLI call
    builds one, and importing dataclasses cost 4 ms of each. Kept as a string, its
    paths made on demand: a client command needs only the socket's, and importing
    pathlib cost 2.9 ms of each.)"""

    __slots__ = ("_root",)

    def __init__(self, root):
        object.__setattr__(self, "_root", os.path.abspath(os.fspath(root)))

    def __setattr__(self, name, value):
        raise AttributeError("Home is immutable")

    def __eq__(self, other) -> bool:
        return isinstance(other, Home) and other._root == self._root

    def __hash__(self) -> int:
        return hash(self._root)

    def __repr__(self) -> str:
        return f"Home(root={self._root!r})"

    @classmethod
    def resolve(cls, value: str | None) -> "Home":
        value = value or os.environ.get("VMREPLICA_HOME")
        if not value:
            raise UsageError("no host home given", hint="pass --home DIR or set VMREPLICA_HOME")
        return cls(os.path.expanduser(value))

    @property
    def root(self) -> Path:
        from pathlib import Path
        return Path(self._root)

    def _at(self, *parts: str) -> str:
        return os.path.join(self._root, *parts)

    @property
    def db(self) -> Path: return self.root / _DB
    @property
    def key(self) -> Path: return self.root / "tls" / "host.key"
    @property
    def cert(self) -> Path: return self.root.joinpath(*_CERT)
    @property
    def vms(self) -> Path: return self.root / "vms"
    @property
    def storage(self) -> Path: return self.root / "storage"
    @property
    def staging(self) -> Path: return self.root / "staging"
    @property
    def run(self) -> Path: return self.root / "run"
    @property
    def socket(self) -> Path: return self.root.joinpath(*_SOCKET)
    @property
    def pidfile(self) -> Path: return self.run / "daemon.pid"
    @property
    def log(self) -> Path: return self.root / "daemon.log"

    @property
    def socket_path(self) -> str:
        """The management socket's path (``socket`` as a string, without pathlib)."""
        return self._at(*_SOCKET)

    def exists(self) -> bool:
        return os.path.exists(self._at(_DB)) and os.path.exists(self._at(*_CERT))

    def require(self) -> None:
        if not self.exists():
            raise UsageError(f"{self._root} is not a vmreplica host home",
                             hint=f"create it with: vmreplica --home {self._root} init --name NAME "
                                  "--listen 127.0.0.1:PORT")


def validate_host_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UsageError(f"invalid host name {name!r}",
                         hint="use letters, digits, '-' and '.', e.g. site-a.example.com")
    return name.lower()


def parse_address(text: str, default_port: int = 8443) -> tuple[str, int]:
    """``HOST[:PORT]`` → (host, port); IPv6 as ``[::1]:PORT``."""
    m = re.fullmatch(r"\[([0-9a-fA-F:]+)\](?::(\d+))?|([^:\s]+)(?::(\d+))?", text or "")
    if not m:
        raise UsageError(f"invalid address {text!r}", hint="use HOST:PORT, e.g. 127.0.0.1:8443")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 0 < port < 65536:
        raise UsageError(f"invalid port in {text!r}")
    return host, port


def init_home(home: Home, name: str, listen: str, driver: str, accel: str,
              web: str | None = None, libvirt_uri: str | None = None) -> dict:
    from ..transport import tls
    from .store import Store

    if home.exists():
        raise Conflict(f"{home.root} is already a vmreplica home",
                       hint="use another directory, or delete this one first")
    name = validate_host_name(name)
    lhost, lport = parse_address(listen)
    if web is None:
        web = f"{lhost}:{lport + 1}" if lport < 65535 else "off"
    if web != "off":
        wh, wp = parse_address(web)
        web = f"{wh}:{wp}"
    if driver not in ("qemu", "libvirt"):
        raise UsageError(f"unknown driver {driver!r}", hint="choose qemu or libvirt")
    if accel not in ("auto", "kvm", "tcg"):
        raise UsageError(f"unknown accelerator {accel!r}", hint="choose auto, kvm or tcg")
    if len(str(home.socket)) > MAX_SOCKET_PATH:
        raise UsageError(f"home path {home.root} is too long for a unix socket",
                         hint="choose a home path shorter than about 90 characters")
    for d in (home.root, home.key.parent, home.vms, home.storage, home.staging, home.run):
        d.mkdir(parents=True, exist_ok=True)
    # libvirt's qemu user (and anyone operating the host) must be able to traverse the home.
    os.chmod(home.root, 0o755)
    os.chmod(home.key.parent, 0o700)
    fingerprint = tls.generate_identity(name, home.key, home.cert)
    store = Store(home.db)
    try:
        store.set_setting("name", name)
        store.set_setting("listen", listen)
        store.set_setting("driver", driver)
        store.set_setting("accel", accel)
        store.set_setting("web_listen", None if web == "off" else web)
        if libvirt_uri:
            store.set_setting("libvirt_uri", libvirt_uri)
        store.set_setting("replica_server", {"enabled": False, "storage": str(home.storage)})
    finally:
        store.close()
    return {"name": name, "listen": listen, "driver": driver, "fingerprint": fingerprint,
            "home": str(home.root), "web": None if web == "off" else web}
