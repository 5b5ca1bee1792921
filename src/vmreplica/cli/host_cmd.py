"""Host commands: init, serve, shutdown, host."""

from __future__ import annotations

import os
import time

from .. import errors
from .main import client_of, home_of
from .render import emit_json

TYPE_CHECKING = False      # (typing itself is 3 ms of import: see service.home)
if TYPE_CHECKING:
    from pathlib import Path

    from ..service.home import Home


def register(sub) -> None:
    p = sub.add_parser("init", help="create a host home (state, TLS identity, folders)")
    p.add_argument("--name", required=True, help="this host's name, e.g. site-a.example.com")
    p.add_argument("--listen", required=True, help="replication address, e.g. 127.0.0.1:8443")
    p.add_argument("--driver", default="qemu", choices=["qemu", "libvirt"])
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"],
                   help="qemu driver accelerator; auto uses KVM only where it boots a guest")
    p.add_argument("--libvirt-uri", help="libvirt driver: the connection (qemu:///system)")
    p.add_argument("--web", metavar="HOST:PORT|off",
                   help="dashboard and /metrics address (default: the listen port + 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run the host daemon")
    p.add_argument("--detach", action="store_true", help="run in the background; return when ready")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("shutdown", help="stop the host daemon cleanly")
    p.set_defaults(func=cmd_shutdown)

    p = sub.add_parser("host", help="show this host's name, address and fingerprint; "
                                    "`host set` changes its addresses")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_host, host_command=None)
    hsub = p.add_subparsers(dest="host_command", metavar="ACTION")
    s = hsub.add_parser(
        "set", help="change this host's replication (listen) or web address",
        description="Change the addresses of a host whose daemon is stopped (`shutdown` "
                    "first; the VMs keep running); the next `serve` listens on them. The "
                    "certificate, pairings, relationships and recovery points stay. The web "
                    "address follows the listen port (+ 1) if it was that default. Paired "
                    "hosts know this one by its old replication address: pair them again.")
    s.add_argument("--listen", metavar="HOST:PORT", help="the new replication address")
    s.add_argument("--web", metavar="HOST:PORT|off", help="the new dashboard and /metrics address")
    s.add_argument("--json", action="store_true")
    s = hsub.add_parser(
        "probe-kvm", help="probe again whether KVM can boot a guest on this machine (~20 s)",
        description="`--accel auto` (the qemu driver) boots a guest under KVM once per "
                    "machine to learn whether KVM works here, and remembers the answer for "
                    "every host on the machine (/var/cache/vmreplica/kvm-probe.json as root, "
                    "else ~/.cache/vmreplica), until the kernel, /dev/kvm or QEMU changes. "
                    "This probes again now; the next VM start uses the new answer.")
    s.add_argument("--json", action="store_true")


def cmd_init(args) -> int:
    from ..service.home import Home, init_home
    home = Home.resolve(args.home)
    info = init_home(home, args.name, args.listen, args.driver, args.accel, web=args.web,
                     libvirt_uri=args.libvirt_uri)
    if args.json:
        emit_json(info)
    else:
        print(f"host {info['name']} created in {info['home']}")
        print(f"  replication address  {info['listen']}")
        print(f"  certificate          {info['fingerprint']}")
        if info.get("web"):
            print(f"  dashboard, /metrics  https://{info['web']}/")
        print(f"next: vmreplica --home {info['home']} serve --detach")
    return 0


def cmd_serve(args) -> int:
    from ..service.daemon import Daemon, setup_logging
    from ..web.app import Dashboard
    home = home_of(args)
    if args.detach:
        pid = spawn_detached(home)
        print(f"daemon running (pid {pid}); log: {home.log}")
        return 0
    setup_logging(home, foreground=True)
    Daemon(home, web=Dashboard).run()
    return 0


def spawn_detached(home: Home, timeout: float = 30.0) -> int:
    """Start `serve` in the background and return its pid once it answers on its socket."""
    import subprocess
    import sys

    from .client import Client
    home.require()
    log_f = open(home.root / "daemon.out", "ab")  # noqa: SIM115 — the daemon's stdout and stderr
    proc = subprocess.Popen([sys.executable, "-m", "vmreplica.cli.main", "--home", str(home.root),
                             "serve"], stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f,
                            start_new_session=True, close_fds=True)
    client = Client(home)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            message, hint = _startup_error(home.root / "daemon.out")
            raise errors.OperationError(f"the daemon exited during start-up: {message}", hint=hint)
        try:
            info = client.call("GET", "/v1/ping")
            if info.get("pid") == proc.pid:
                return proc.pid
        except errors.OperationError:
            pass
        time.sleep(0.05)
    proc.terminate()
    raise errors.OperationError(f"the daemon did not become ready within {timeout:.0f} s",
                         hint=f"see {home.log}")


def _startup_error(path: Path) -> tuple[str, str | None]:
    """The last `error:` line (and its hint) the failed daemon printed."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            hint = lines[i + 1][len("hint: "):] if i + 1 < len(lines) and \
                lines[i + 1].startswith("hint: ") else None
            return lines[i][len("error: "):], hint
    return (lines[-1] if lines else "no message"), f"see {path}"


def cmd_shutdown(args) -> int:
    client = client_of(args)
    try:
        info = client.call("POST", "/v1/shutdown")
    except errors.DaemonNotRunning:
        print("daemon is not running")
        return 0
    pid = info.get("pid")
    deadline = time.monotonic() + 60
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        if pid:
            raise errors.OperationError(f"daemon (pid {pid}) did not stop within 60 s")
    print("daemon stopped")
    return 0


def cmd_host(args) -> int:
    if args.host_command == "set":
        return cmd_host_set(args)
    if args.host_command == "probe-kvm":
        return cmd_probe_kvm(args)
    info = client_of(args).call("GET", "/v1/host")
    if args.json:
        emit_json(info)
    else:
        for k in ("name", "listen", "driver", "fingerprint", "home", "version"):
            print(f"{k:12} {info.get(k)}")
        if info.get("accel"):
            print(f"{'accelerator':12} {_accel_text(info['accel'])}")
    return 0


def _accel_text(a: dict) -> str:
    if a["setting"] != "auto" or a["driver"] != "qemu":
        return f"{a['answer']} ({a['setting']}: {a['reason']})"
    if not a.get("answer"):
        return ("auto: not probed on this machine yet (the first VM start probes whether "
                "KVM boots a guest, ~20 s, once per machine)")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(a["checked_at"])) \
        if a.get("checked_at") else "?"
    return (f"{a['answer']} (auto: {a['reason']}; probed {when}, remembered in {a['cache']}; "
            "`vmreplica host probe-kvm` probes again)")


def cmd_probe_kvm(args) -> int:
    from .render import watch
    client = client_of(args)
    info = watch(client, "probe-kvm", lambda: client.call("POST", "/v1/host/probe-kvm"),
                 show=not args.json)
    if args.json:
        emit_json(info)
        return 0
    if info.get("booted"):
        print(f"KVM probe: {info['answer']} ({info['reason']}; {info['probe_seconds']:.1f} s)")
        where = info.get("remembered_in") or "nowhere (the cache folder is not writable)"
        print(f"remembered for this machine in {where}")
    else:
        print(f"KVM probe: {info['answer']} ({info['reason']}; known without booting a "
              "guest, not remembered)")
    if info["setting"] != "auto":
        print(f"this host uses --accel {info['setting']} whatever the probe says")
    return 0


def cmd_host_set(args) -> int:
    from ..service.home import Home, set_addresses
    info = set_addresses(Home.resolve(args.home), listen=args.listen, web=args.web)
    if args.json:
        emit_json(info)
        return 0
    for what, old, new in (("replication address", info["old_listen"], info["listen"]),
                           ("dashboard, /metrics", info["old_web"], info["web"])):
        new, old = new or "off", old or "off"
        print(f"  {what}  {new}" + (f"   (was {old})" if old != new else "   (unchanged)"))
    print("  certificate, pairings, relationships and recovery points unchanged")
    if info["peers_to_tell"]:
        print(f"paired hosts know {info['name']} at {info['old_listen']}: "
              f"{', '.join(info['peers_to_tell'])}. Once the daemon runs, on each of them pair "
              f"again (same certificates; relationships go on): here `vmreplica trust token`, "
              f"there `vmreplica trust pair {info['listen']} TOKEN`")
    print(f"next: vmreplica --home {info['home']} serve --detach")
    return 0
