"""Start child processes from one long-lived thread.

Storage daemons are started with a parent-death signal (`setpriv --pdeathsig`) so that a
vmreplica daemon that dies takes them down cleanly. Linux sends that signal when the
*thread* that forked the child exits, not the process; request threads come and go, so
every such child is forked by this one thread, which lives as long as the process.
"""

from __future__ import annotations

import queue
import subprocess
import threading

_requests: queue.Queue = queue.Queue()
_thread: threading.Thread | None = None
_guard = threading.Lock()


def _serve() -> None:
    while True:
        args, kwargs, box, done = _requests.get()
        try:
            box.append(subprocess.Popen(args, **kwargs))
        except BaseException as e:  # noqa: BLE001 — handed back to the caller
            box.append(e)
        done.set()


def popen(args: list[str], **kwargs) -> subprocess.Popen:
    global _thread
    with _guard:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_serve, name="spawner", daemon=True)
            _thread.start()
    box: list = []
    done = threading.Event()
    _requests.put((args, kwargs, box, done))
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
