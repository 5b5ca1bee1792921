"""The management client turns a daemon that drops the connection into a clear error.

`serve --detach` polls the new daemon with this client and retries on OperationError; a
reset connection (the previous daemon of the home closing its socket while the new one
starts) once escaped as a bare ConnectionResetError and failed the start.
"""

from __future__ import annotations

import select
import socket
import threading
from types import SimpleNamespace

import pytest

from vmreplica import errors
from vmreplica.cli.client import Client


def _home(tmp_path):
    return SimpleNamespace(root=tmp_path, socket=tmp_path / "daemon.sock",
                           socket_path=str(tmp_path / "daemon.sock"),
                           log=tmp_path / "daemon.log")


def test_a_connection_reset_by_a_closing_daemon_is_an_operation_error(tmp_path):
    home = _home(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home.socket))
    listener.listen(4)

    def close_once_a_client_waits():
        # A pending connection makes the listening socket readable; closing it without
        # accepting resets that connection, as a daemon that stops does.
        if select.select([listener], [], [], 10)[0]:
            listener.close()

    t = threading.Thread(target=close_once_a_client_waits)
    t.start()
    try:
        with pytest.raises(errors.OperationError, match="closed the connection"):
            Client(home, timeout=10).call("GET", "/v1/ping")
    finally:
        t.join()
        listener.close()


def test_no_socket_says_no_daemon_is_running(tmp_path):
    with pytest.raises(errors.DaemonNotRunning, match="no vmreplica daemon is running"):
        Client(_home(tmp_path)).call("GET", "/v1/ping")
