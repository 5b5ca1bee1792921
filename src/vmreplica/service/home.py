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
    _root: str

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
    def resolve(cls, value: str | None) -> Home:
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
    parse_address(listen)
    if web is None:
        web = default_web(listen)
    if web != "off":
        web = format_address(*parse_address(web))
    if driver not in ("qemu", "libvirt"):
        raise UsageError(f"unknown driver {driver!r}", hint="choose qemu or libvirt")
    if accel not in ("auto", "kvm", "tcg"):
        raise UsageError(f"unknown accelerator {accel!r}", hint="choose auto, kvm or tcg")
    if len(str(home.socket)) > MAX_SOCKET_PATH:
        raise UsageError(f"home path {home.root} is too long for a unix socket",
                         hint="choose a home path shorter than about 90 characters")
    # Both ports it will listen on, before anything is made (a refused init leaves nothing).
    check_ports(home, listen, web)
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


# -- the two ports a host listens on, and changing them later ------------------------------
def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_web(listen: str) -> str:
    """The web listener's address when none is given: the listen port + 1 (or off)."""
    lhost, lport = parse_address(listen)
    return format_address(lhost, lport + 1) if lport < 65535 else "off"


def _listeners() -> dict[int, list[str]]:
    """Listening TCP sockets of this machine: port → socket inodes (from /proc/net)."""
    found: dict[int, list[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A":                     # LISTEN
                found.setdefault(int(cols[1].rsplit(":", 1)[1], 16), []).append(cols[9])
    return found


def _home_settings(root: str) -> dict:
    """Another home's listen and web addresses, read-only (empty if unreadable)."""
    import sqlite3
    try:
        db = sqlite3.connect(f"file:{os.path.join(root, _DB)}?mode=ro", uri=True, timeout=1)
        try:
            rows = db.execute("SELECT key, value FROM settings WHERE key IN "
                              "('name', 'listen', 'web_listen')").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    import json
    return {k: json.loads(v) for k, v in rows}


_ANY = ("", "0.0.0.0", "::", "*")


def _overlap(a: str | None, b: str | None) -> bool:
    """Whether two listen hosts can collide (the same, or either one every address)."""
    return a is None or b is None or a == b or a in _ANY or b in _ANY


def _role_in(root: str, port: int, host: str | None = None) -> str:
    """What ``port`` (on ``host``; None: whichever) is to the home at ``root``:
    "site-a's replication port", "site-a's web port" or ''."""
    s = _home_settings(root)
    for key, role in (("listen", "replication port"), ("web_listen", "web port")):
        try:
            if s.get(key) and parse_address(s[key])[1] == port and \
                    _overlap(parse_address(s[key])[0], host):
                return f"{s['name']}'s {role}" if s.get("name") else role
        except UsageError:
            continue
    return ""


def port_holder(port: int) -> str | None:
    """Who listens on ``port`` on this machine, as far as /proc tells (None if unknown):
    "pid 812 (the vmreplica daemon of /srv/site-a: site-a's web port)"."""
    inodes = {f"socket:[{i}]" for i in _listeners().get(port, [])}
    if not inodes:
        return None
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") not in inodes:
                    continue
            except OSError:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                argv = []
            if "serve" in argv and "--home" in argv and argv.index("--home") + 1 < len(argv):
                root = argv[argv.index("--home") + 1]
                role = _role_in(root, port)
                return f"pid {pid} (the vmreplica daemon of {root}" + \
                    (f": {role})" if role else ")")
            return f"pid {pid} ({' '.join(' '.join(argv).split())[:80] or '?'})"
    return "another process"


def _claimed_by_neighbour(home: Home, host: str, port: int) -> str | None:
    """A home beside this one (same parent folder) that will listen on ``port`` when its
    daemon runs: "site-a's web port (home /srv/site-a; ...)"."""
    parent = os.path.dirname(home._root)
    try:
        entries = os.listdir(parent)
    except OSError:
        return None
    for e in sorted(entries):
        other = os.path.join(parent, e)
        if other == home._root or not Home(other).exists():
            continue
        role = _role_in(other, port, host)
        if role:
            return f"{role} (home {other}; it listens there when its daemon runs)"
    return None


def check_ports(home: Home, listen: str, web: str) -> None:
    """Refuse (naming the port, its use here, and who holds it) when a port this host will
    listen on is taken now, or is one a home beside it listens on when its daemon runs."""
    import ipaddress
    import socket
    wanted = [("the replication port, --listen", listen)] + \
        ([("the web port, --web", web)] if web != "off" else [])
    ports = [parse_address(a) for _, a in wanted]
    if len(ports) == 2 and ports[0][1] == ports[1][1]:
        raise Conflict(f"the replication and web addresses use the same port {ports[0][1]}",
                       hint="give --web another port, or --web off")
    for (what, _addr), (h, port) in zip(wanted, ports, strict=True):
        flag = "--listen" if "listen" in what else "--web"
        taken = None
        try:
            ip = str(ipaddress.ip_address("127.0.0.1" if h == "localhost" else h))
        except ValueError:
            ip = None                     # a name: no look-up here, the daemon resolves it
        try:
            if ip is not None:
                with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((ip, port))
        except OSError as e:
            import errno
            # Only a port in use refuses: an address not up yet (a cluster's, a namespace's)
            # or a name is the daemon's to bind, and `serve` says what is wrong with it.
            if e.errno == errno.EADDRINUSE:
                taken = f"is in use by {port_holder(port) or 'another process'}"
        if taken is None:
            claim = _claimed_by_neighbour(home, h, port)
            if claim:
                taken = f"is {claim}"
        if taken:
            raise Conflict(f"port {port} ({what}) {taken}",
                           hint=f"choose another port with {flag}" +
                                (" (the web port defaults to the listen port + 1)"
                                 if flag == "--listen" else " (or --web off)"))


def daemon_lock(home: Home):
    """Hold the home's daemon lock (no daemon may run meanwhile), or refuse if one runs."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        os.makedirs(home._at("run"), exist_ok=True)
        fd = os.open(home._at("run", "daemon.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict(f"the daemon of {home._root} is running",
                               hint=f"stop it first: vmreplica --home {home._root} shutdown "
                                    "(the VMs keep running), then change the address and "
                                    "start it again with `serve --detach`") from None
            yield
        finally:
            os.close(fd)
    return held()


def set_addresses(home: Home, listen: str | None = None, web: str | None = None) -> dict:
    """`host set`: change the replication (listen) and/or web address of a home whose
    daemon is stopped; the identity, pairings, relationships and points stay as they are.
    The web address follows the listen port (+ 1) when it was that default and no --web
    is given. The daemon uses the new addresses when it starts."""
    from .store import Store
    home.require()
    if listen is None and web is None:
        raise UsageError("nothing to change", hint="give --listen HOST:PORT and/or --web HOST:PORT|off")
    with daemon_lock(home):
        store = Store(home.db)
        try:
            old_listen = store.get_setting("listen")
            old_web = store.get_setting("web_listen") or "off"
            new_listen = old_listen
            if listen is not None:
                h, p = parse_address(listen)
                new_listen = format_address(h, p)
            if web is not None:
                new_web = "off" if web == "off" else format_address(*parse_address(web))
            elif old_web != "off" and old_web == default_web(old_listen):
                new_web = default_web(new_listen)          # it followed the listen port
            else:
                new_web = old_web
            check_ports(home, new_listen, new_web)
            store.set_setting("listen", new_listen)
            store.set_setting("web_listen", None if new_web == "off" else new_web)
            changes = [f"{what} {a} → {b}" for what, a, b in
                       (("replication address", old_listen, new_listen),
                        ("web address", old_web, new_web)) if a != b]
            if changes:
                store.add_event("host", "changed (daemon stopped): " + "; ".join(changes))
            peers = [p["name"] for p in store.peers()] if new_listen != old_listen else []
            name = store.get_setting("name")
        finally:
            store.close()
    return {"name": name, "home": str(home.root), "listen": new_listen, "old_listen": old_listen,
            "web": None if new_web == "off" else new_web,
            "old_web": None if old_web == "off" else old_web, "peers_to_tell": peers}
