"""The daemon process: start-up recovery, the two servers, the scheduler, clean shutdown.

The dashboard on the web port is handed in by whoever starts the daemon (`serve`:
``web.app.Dashboard``): the service layer does not import the web layer above it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from socketserver import BaseServer
from typing import Protocol

from ..errors import Conflict, OperationError
from ..transport.http import Router
from .api import management_routes, replication_routes
from .home import Home, parse_address
from .host import Host
from .scheduler import Scheduler

log = logging.getLogger("vmreplica.daemon")


class WebApp(Protocol):
    """The dashboard a daemon serves on its web port (``web.app.Dashboard``)."""

    def new_token(self) -> str:
        """A one-time login token (`vmreplica dashboard`)."""
        ...

    def routes(self, host: Host) -> Router:
        ...


class Daemon:
    def __init__(self, home: Home, web: Callable[[str], WebApp] | None = None):
        """``web`` makes the dashboard, given the web port (its login cookie is named after
        it); without it the daemon serves no web listener."""
        self.home = home
        self.started_at = time.time()
        self._stopped = threading.Event()
        self._stopping = threading.Event()
        self._lockfd: int | None = None
        self.host: Host | None = None
        self.servers: list[BaseServer] = []
        self.scheduler: Scheduler | None = None
        self.web = web(self._web_port()) if web is not None else None

    def _web_port(self) -> str:
        from .store import Store
        store = Store(self.home.db)
        try:
            web = store.get_setting("web_listen") or ""
        finally:
            store.close()
        return web.rsplit(":", 1)[-1] or "off"

    def _lock(self) -> None:
        self.home.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.home.run / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(f"a vmreplica daemon already runs for {self.home.root}",
                           hint="stop it with `vmreplica shutdown`") from None
        self._lockfd = fd
        self.home.pidfile.write_text(f"{os.getpid()}\n")

    def run(self) -> None:
        self.home.require()
        self._lock()
        from http.server import HTTPServer  # noqa: F401  (imported early: fail fast)

        from ..transport.http import TLSHTTPServer, UnixHTTPServer, serve_in_thread
        host = self.host = Host(self.home)
        log.info("daemon for %s starting (pid %d)", host.name, os.getpid())
        from ..qemutools.qsd import reap
        reaped = reap(self.home.run)
        if reaped:
            log.warning("stopped %d storage daemon(s) left by a previous run", len(reaped))
        from ..replica.recovery import recover
        redone = recover(host)
        if redone:
            log.warning("re-applied %d staged cycle(s) at start-up: %s", len(redone), redone)
        for vm in host.driver.drop_left_views():
            log.warning("removed the fleecing view a dead daemon left in %s's QEMU", vm)
        resumed = host.driver.resume_left_paused()
        for vm in resumed:
            log.warning("resumed %s: the previous daemon died while it held the VM paused "
                        "(a cycle or continuous mode's hand-over)", vm)
            host.event("daemon", "resumed the VM: the previous daemon died while it held the "
                                 "VM paused (a cycle or continuous mode's hand-over)", vm)
        from ..replica.reip import resume_all
        for vm in resume_all(host):
            log.warning("re-IP of %s taken up again: the previous daemon stopped while it "
                        "waited for the guest agent", vm)
        h, port = parse_address(host.listen)
        try:
            repl = TLSHTTPServer((h, port), replication_routes(host), host.server_context)
        except OSError as e:
            raise self._cannot_listen(host.listen, "its replication port", "--listen", e) from None
        # Both TCP ports before the management socket: a port it cannot have leaves no
        # socket behind for a client to find.
        web = None
        web_listen = host.store.get_setting("web_listen")
        if web_listen and self.web is not None:
            from ..transport import tls
            wh, wp = parse_address(web_listen)
            web_ctx = tls.server_context(self.home.cert, self.home.key, [])
            try:
                web = TLSHTTPServer((wh, wp), self.web.routes(host), lambda: web_ctx)
            except OSError as e:
                repl.server_close()
                raise self._cannot_listen(web_listen, "its web port (dashboard and /metrics)",
                                          "--web", e) from None
        sock = str(self.home.socket)
        if os.path.exists(sock):
            os.unlink(sock)
        mgmt = UnixHTTPServer(sock, management_routes(host, self))
        os.chmod(sock, 0o600)
        self.servers = [repl, mgmt]
        if web is not None:
            self.servers.append(web)
            serve_in_thread(web, "web")
        serve_in_thread(repl, "replication-api")
        serve_in_thread(mgmt, "management-api")
        from ..replica.mirror import reopen_targets
        reopen_targets(host)
        self.scheduler = Scheduler(host)
        self.scheduler.start()
        host.event("daemon", f"daemon started (pid {os.getpid()}), listening on {host.listen}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        log.info("ready: management %s, replication %s", sock, host.listen)
        self._stopped.wait()
        log.info("stopped")

    def _cannot_listen(self, address: str, what: str, flag: str, e: OSError) -> OperationError:
        """The error of a port this daemon cannot listen on: which port, what it is to this
        host, who holds it (when /proc tells), and the command that changes it."""
        import errno

        from .home import port_holder
        port = parse_address(address)[1]
        reason = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            holder = port_holder(port)
            reason += f" (by {holder})" if holder else ""
        alt = "HOST:PORT|off" if flag == "--web" else "HOST:PORT"
        return OperationError(
            f"cannot listen on port {port} ({address}), {what}: {reason}",
            hint=f"stop what uses it, or give this host another port: "
                 f"vmreplica --home {self.home.root} host set {flag} {alt}, then serve again")

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
        if self._stopped.is_set():
            return
        if self.scheduler:
            self.scheduler.stop()
        for s in self.servers:
            s.shutdown()
            s.server_close()
        if self.host:
            self.host.event("daemon", "daemon stopped")
            self.host.close()
        try:
            os.unlink(self.home.socket)
        except OSError:
            pass
        self.home.pidfile.unlink(missing_ok=True)
        self._stopped.set()


def setup_logging(home: Home, foreground: bool) -> None:
    log_file = logging.FileHandler(home.log)
    handlers: list[logging.Handler] = [log_file]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `kill -USR1 <daemon pid>` appends every thread's stack to the log (what is it
    # waiting for?) and the daemon goes on.
    import faulthandler
    import signal
    assert log_file.stream is not None          # (not delayed: opened above)
    faulthandler.register(signal.SIGUSR1, file=log_file.stream, all_threads=True)
