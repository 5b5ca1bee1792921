"""The QMP client takes only the reply with its command's id: a stray reply (another
command's, seen in CI) is logged and skipped, never taken for the answer."""

from __future__ import annotations

import json
import logging
import socket
import threading

from vmreplica.qemutools.qmp import Monitor


def _server(path, script):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def run():
        c, _ = srv.accept()
        f = c.makefile("rwb")
        f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        f.flush()
        for line in f:
            msg = json.loads(line)
            for out in script(msg):
                f.write(json.dumps(out).encode() + b"\n")
                f.flush()
        c.close()
    threading.Thread(target=run, daemon=True).start()
    return srv


def test_a_stray_reply_is_skipped(tmp_path, caplog):
    def script(msg):
        if msg["execute"] == "query-status":
            yield {"return": {}, "id": "someone-else"}
            yield {"event": "X", "data": {}}
        yield {"return": {"status": "running"} if msg["execute"] == "query-status" else {},
               "id": msg["id"]}
    srv = _server(tmp_path / "m.sock", script)
    with caplog.at_level(logging.WARNING, logger="vmreplica.qmp"):
        with Monitor(tmp_path / "m.sock", timeout=5) as m:
            assert m.execute("query-status") == {"status": "running"}
            assert [e["event"] for e in m.events] == ["X"]
    assert "a reply that is not for query-status" in caplog.text
    srv.close()
